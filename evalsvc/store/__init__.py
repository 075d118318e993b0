"""Persistence: SQLModel tables (`models`), engines and transactions (`db`), and the queries of each
domain (`runs`, `jobs`, `events`, `datasets`). Nothing above this package writes SQL."""
