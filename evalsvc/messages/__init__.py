"""The contract's shared vocabulary, below the store and every service: row <-> message conversion
(`convert`), field checks every request shares (`validation`), canonical forms that cache keys hash
(`canonical`), what an unset oneof's violation says (`oneofs`), webhook event types
(`webhook_events`) and messages handed on already serialized (`encoded`). No I/O, nothing from the layers above."""
