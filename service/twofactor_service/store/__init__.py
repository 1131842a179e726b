"""PostgreSQL through asyncpg: plain SQL, one module per aggregate; callers own the transaction."""
