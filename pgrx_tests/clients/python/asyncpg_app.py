"""asyncpg against pg_kms: like node-postgres it sends parameters untyped,
so the README's insert needs `$1::bigint` (the old form fails with 42P08).
Run by pgrx_tests/tests/clients.rs as `python asyncpg_app.py [explicit]`;
the part between `# recipe:` and `# end recipe` is quoted verbatim in
docs/clients.md (the test checks that they match).
"""

import asyncio

import asyncpg

from common import check, done, styles

# recipe: asyncpg explicit
INSERT = """
    INSERT INTO asyncpg_customers (id, email, email_bidx, phone, name)
    VALUES ($1::bigint, kms_encrypt($2, 'pii', $1::bigint::text),
            kms_blind_index($2, 'pii', NULL, 64),
            kms_encrypt($3, 'pii', $1::bigint::text), $4)"""

FIND_BY_EMAIL = """
    SELECT id, kms_decrypt(email, id::text) AS email,
           kms_decrypt(phone, id::text) AS phone, name
      FROM asyncpg_customers
     WHERE email_bidx = kms_blind_index($1, 'pii', NULL, 64)  -- index scan
       AND kms_decrypt(email, id::text) = $1                  -- recheck"""
# end recipe

OLD_INSERT = """
    INSERT INTO asyncpg_customers (id, email, email_bidx)
    VALUES ($1, kms_encrypt($2, 'pii', $1::text), kms_blind_index($2, 'pii', NULL, 64))"""


async def explicit(conn):
    await conn.execute("DELETE FROM asyncpg_customers")
    await conn.executemany(INSERT, [(i, f"user{i}@example.com", f"+1 555 06{i:02d}", f"User {i}") for i in range(1, 11)])
    rows = await conn.fetch("SELECT id, kms_decrypt(email, id::text) AS email FROM asyncpg_customers ORDER BY id")
    check([(r["id"], r["email"]) for r in rows] == [(i, f"user{i}@example.com") for i in range(1, 11)],
          "executemany with $1::bigint (10 rows), select decrypted")
    try:
        await conn.execute(OLD_INSERT, 11, "old@example.com")
        state = "ok"
    except asyncpg.PostgresError as e:
        state = e.sqlstate
    check(state == "42P08", f"the old recipe ($1 and $1::text) fails with 42P08 on asyncpg (got {state})")
    row = await conn.fetchrow(FIND_BY_EMAIL, "user9@example.com")
    check(row is not None and row["id"] == 9 and row["name"] == "User 9", "blind-index lookup")
    check(await conn.fetchrow(FIND_BY_EMAIL, "nobody@example.com") is None, "lookup of an unknown value finds nothing")


async def main():
    conn = await asyncpg.connect()  # PGHOST, PGPORT, PGUSER, PGDATABASE
    try:
        for style in styles():
            if style == "explicit":
                await explicit(conn)
            else:
                raise SystemExit(f"unknown style {style}")
    finally:
        await conn.close()
    done("asyncpg " + asyncpg.__version__)


if __name__ == "__main__":
    asyncio.run(main())
