"""psycopg 3 on the decrypted view (`psycopg_app.py view`): plain SQL on
psycopg_accounts_decrypted, no pg_kms function in the application's code."""

from common import check, sqlstate_of
from verify import STORED

# recipe: psycopg view
# psycopg_accounts (email, phone protected, context id::text) is read and
# written through the view pg_kms made for it, like a table.
INSERT = """
    INSERT INTO psycopg_accounts_decrypted (email, phone, name)
    VALUES (%s, %s, %s) RETURNING id"""


def add_accounts(conn, rows):
    with conn.cursor() as cur:
        cur.executemany(INSERT, rows, returning=True)
        ids = []
        while True:
            ids.append(cur.fetchone()[0])
            if not cur.nextset():
                return ids


def find_by_email(conn, email):  # index scan on the blind index, then recheck
    return conn.execute("""
        SELECT id, email, phone, name FROM psycopg_accounts_decrypted
         WHERE email_bidx = kms_blind_index(%(email)s, 'pii', NULL, 64)
           AND email = %(email)s""", {"email": email}).fetchone()


def copy_in(conn, rows):
    with conn.cursor().copy("COPY psycopg_accounts_decrypted (email, phone, name) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
# end recipe


def run(conn):
    conn.execute("DELETE FROM psycopg_accounts_decrypted")
    one = conn.execute(INSERT, ("a1@example.com", "+1 555 0701", "A 1")).fetchone()[0]
    check(isinstance(one, int), "insert into the view: identity id read back (RETURNING)")
    row = conn.execute("SELECT id, email, phone, name FROM psycopg_accounts_decrypted WHERE id = %s", (one,)).fetchone()
    check(row == (one, "a1@example.com", "+1 555 0701", "A 1"), "select from the view: decrypted")
    ids = add_accounts(conn, [(f"a{i}@example.com", f"+1 555 07{i:02d}", f"A {i}") for i in range(2, 11)])
    check(len(set(ids)) == 9 and one not in ids, "executemany(returning=True): 9 rows, 9 ids")
    copy_in(conn, [(f"a{i}@example.com", None, f"A {i}") for i in range(11, 16)])
    good, total = conn.execute(STORED.format(table="psycopg_accounts")).fetchone()
    check((good, total) == (15, 15), "COPY into the view; all 15 rows stored encrypted with their id as context, blind index filled")
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT email, name FROM psycopg_accounts_decrypted WHERE id = %b", (ids[0],))
        check(cur.fetchone() == ("a2@example.com", "A 2"), "binary protocol on the view")
    found = find_by_email(conn, "a5@example.com")
    check(found is not None and found[0] == ids[3], "blind-index lookup on the view")
    check(conn.execute("SELECT id FROM psycopg_accounts_decrypted WHERE email = %s", ("a6@example.com",)).fetchone()[0] == ids[4],
          "plain equality on the view's decrypted column (a scan)")
    before = conn.execute("SELECT email::bytea FROM psycopg_accounts WHERE id = %s", (one,)).fetchone()[0]
    conn.execute("UPDATE psycopg_accounts_decrypted SET name = %s WHERE id = %s", ("A one", one))
    after = conn.execute("SELECT email::bytea FROM psycopg_accounts WHERE id = %s", (one,)).fetchone()[0]
    check(before == after, "update of another column keeps the stored ciphertext")
    cur = conn.execute("UPDATE psycopg_accounts_decrypted SET email = %s WHERE id = %s", ("one@example.org", one))
    check(cur.rowcount == 1, "update of the protected column: rowcount 1")
    check(find_by_email(conn, "one@example.org")[0] == one and find_by_email(conn, "a1@example.com") is None,
          "update re-encrypts and re-indexes")
    cur = conn.execute("DELETE FROM psycopg_accounts_decrypted WHERE id = %s", (one,))
    check(cur.rowcount == 1 and find_by_email(conn, "one@example.org") is None, "delete through the view")
    with conn.cursor().copy("COPY (SELECT id, email FROM psycopg_accounts_decrypted ORDER BY id) TO STDOUT") as copy:
        copy.set_types(["int8", "text"])
        out = list(copy.rows())
    check(len(out) == 14 and out[0] == (ids[0], "a2@example.com"), "COPY out of the view: decrypted")
    good, total = conn.execute(STORED.format(table="psycopg_accounts")).fetchone()
    check((good, total) == (14, 14), "after update and delete: 14 rows, all stored right")
    # PostgreSQL's limits on views with INSTEAD OF triggers: no upsert, and
    # ON CONFLICT DO NOTHING does not apply to the table's constraints.
    state = sqlstate_of(lambda: conn.execute(
        "INSERT INTO psycopg_accounts_decrypted (id, email) VALUES (%s, %s)"
        " ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email", (ids[0], "x@example.com")))
    check(state == "42P10", f"INSERT ... ON CONFLICT (id) DO UPDATE on the view is refused ({state})")
    state = sqlstate_of(lambda: conn.execute(
        "INSERT INTO psycopg_accounts_decrypted (id, email) VALUES (%s, %s) ON CONFLICT DO NOTHING", (ids[0], "x@example.com")))
    check(state == "23505", f"INSERT ... ON CONFLICT DO NOTHING of a duplicate id still raises the table's unique violation ({state})")
