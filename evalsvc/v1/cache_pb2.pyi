from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class CacheMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_MODE_UNSPECIFIED: _ClassVar[CacheMode]
    CACHE_MODE_OFF: _ClassVar[CacheMode]
    CACHE_MODE_READ_WRITE: _ClassVar[CacheMode]
    CACHE_MODE_REFRESH: _ClassVar[CacheMode]
    CACHE_MODE_REPLAY: _ClassVar[CacheMode]
CACHE_MODE_UNSPECIFIED: CacheMode
CACHE_MODE_OFF: CacheMode
CACHE_MODE_READ_WRITE: CacheMode
CACHE_MODE_REFRESH: CacheMode
CACHE_MODE_REPLAY: CacheMode
