"""psycopg 3 against pg_kms: text and binary protocol, executemany, COPY in
and out. Run by pgrx_tests/tests/clients.rs as `python psycopg_app.py
[explicit] [view]`; the parts between `# recipe:` and `# end recipe` are
quoted verbatim in docs/clients.md (the test checks that they match).
"""

import psycopg
from psycopg.adapt import Dumper
from psycopg.types import TypeInfo

from common import check, done, sqlstate_of, styles

PEOPLE = [(i, f"user{i}@example.com", f"+1 555 01{i:02d}", f"User {i}") for i in range(1, 21)]


# recipe: psycopg explicit
# Plaintext goes only into bind parameters; the row id is the context.
INSERT = """
    INSERT INTO psycopg_customers (id, email, email_bidx, phone, name)
    VALUES (%(id)s, kms_encrypt(%(email)s, 'pii', %(id)s::bigint::text),
            kms_blind_index(%(email)s, 'pii', NULL, 64),
            kms_encrypt(%(phone)s, 'pii', %(id)s::bigint::text), %(name)s)"""

SELECT = """
    SELECT id, kms_decrypt(email, id::text) AS email,
           kms_decrypt(phone, id::text) AS phone, name
      FROM psycopg_customers"""

FIND_BY_EMAIL = SELECT + """
     WHERE email_bidx = kms_blind_index(%(email)s, 'pii', NULL, 64)  -- index scan
       AND kms_decrypt(email, id::text) = %(email)s                  -- recheck"""

UPDATE_EMAIL = """
    UPDATE psycopg_customers
       SET email = kms_encrypt(%(email)s, 'pii', id::text),
           email_bidx = kms_blind_index(%(email)s, 'pii', NULL, 64)
     WHERE id = %(id)s"""


def add_customers(conn, people):
    with conn.cursor() as cur:
        cur.executemany(INSERT, [dict(id=i, email=e, phone=p, name=n) for i, e, p, n in people])


def find_by_email(conn, email):
    return conn.execute(FIND_BY_EMAIL, {"email": email}).fetchone()
# end recipe


# recipe: psycopg copy
def copy_in_plaintext(conn, people):
    """COPY plaintext into a temporary table, then encrypt it with one INSERT."""
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE staging (id bigint, email text, phone text, name text) ON COMMIT DROP")
        with conn.cursor().copy("COPY staging (id, email, phone, name) FROM STDIN") as copy:
            for row in people:
                copy.write_row(row)
        conn.execute("""
            INSERT INTO psycopg_customers (id, email, email_bidx, phone, name)
            SELECT id, kms_encrypt(email, 'pii', id::text), kms_blind_index(email, 'pii', NULL, 64),
                   kms_encrypt(phone, 'pii', id::text), name
              FROM staging""")


def copy_out_plaintext(conn):
    with conn.cursor().copy("""
            COPY (SELECT id, kms_decrypt(email, id::text), kms_decrypt(phone, id::text), name
                    FROM psycopg_customers ORDER BY id) TO STDOUT""") as copy:
        copy.set_types(["int8", "text", "text", "text"])
        return list(copy.rows())


def copy_ciphertext(conn, src, dst, fmt):
    """Moves ciphertext between tables unchanged (a backup, an archive)."""
    with conn.cursor().copy(f"COPY {src} TO STDOUT (FORMAT {fmt})") as out:
        data = b"".join(bytes(b) for b in out)
    with conn.cursor().copy(f"COPY {dst} FROM STDIN (FORMAT {fmt})") as cin:
        cin.write(data)
# end recipe


# recipe: psycopg binary
class Ciphertext(bytes):
    """An encrypted_text value in its binary wire form (psycopg returns
    encrypted_text columns of a binary cursor as bytes)."""


def register_ciphertext(conn):
    oid = TypeInfo.fetch(conn, "encrypted_text").oid

    class CiphertextDumper(Dumper):
        format = psycopg.pq.Format.BINARY

        def dump(self, obj):
            return bytes(obj)

    CiphertextDumper.oid = oid
    conn.adapters.register_dumper(Ciphertext, CiphertextDumper)
# end recipe


def explicit(conn):
    conn.execute("DELETE FROM psycopg_customers; DELETE FROM psycopg_archive")
    add_customers(conn, PEOPLE[:10])
    rows = conn.execute(SELECT + " ORDER BY id").fetchall()
    check(rows == [(i, e, p, n) for i, e, p, n in PEOPLE[:10]], "text protocol: executemany insert, then select decrypted (10 rows)")
    stored = conn.execute("SELECT count(*) FROM psycopg_customers WHERE email::text LIKE 'kms:%' AND kms_key_name(email) = 'pii'").fetchone()[0]
    check(stored == 10, "stored values are pg_kms envelopes under key pii")

    row = find_by_email(conn, "user7@example.com")
    check(row is not None and row[0] == 7, "blind-index lookup finds id 7")
    check(find_by_email(conn, "nobody@example.com") is None, "blind-index lookup of an unknown value finds nothing")

    conn.execute(UPDATE_EMAIL, {"id": 7, "email": "seven@example.org"})
    check(find_by_email(conn, "seven@example.org")[0] == 7 and find_by_email(conn, "user7@example.com") is None,
          "update re-encrypts and re-indexes: new value found, old not")
    conn.execute("DELETE FROM psycopg_customers WHERE id = %s", (7,))
    check(find_by_email(conn, "seven@example.org") is None, "delete")

    # A value moved to another row does not decrypt there (context = id).
    state = sqlstate_of(lambda: conn.execute(
        "SELECT kms_decrypt(email, '2') FROM psycopg_customers WHERE id = 1").fetchall())
    check(state == "39000", f"a value read with another row's context fails (SQLSTATE {state})")

    # Binary protocol: parameters and results in binary format.
    with conn.cursor(binary=True) as cur:
        cur.execute("""
            INSERT INTO psycopg_customers (id, email, email_bidx, phone, name)
            VALUES (%b, kms_encrypt(%b, 'pii', %b::text), kms_blind_index(%b, 'pii', NULL, 64),
                    kms_encrypt(%b, 'pii', %b::text), %b)""",
                    (11, PEOPLE[10][1], "11", PEOPLE[10][1], PEOPLE[10][2], "11", PEOPLE[10][3]))
        cur.execute(SELECT + " WHERE id = %b", (11,))
        check(cur.fetchone() == tuple(PEOPLE[10]), "binary protocol: insert and select decrypted")
        cur.execute("SELECT id, email, email_bidx, phone, name FROM psycopg_customers WHERE id <= 3 ORDER BY id")
        raw = cur.fetchall()
    check(all(isinstance(r[1], bytes) and len(r[1]) > 16 for r in raw), "binary protocol: encrypted_text arrives as bytes")
    text_form = conn.execute("SELECT email::text FROM psycopg_customers WHERE id = 1").fetchone()[0]
    check(text_form.startswith("kms:"), "text protocol: encrypted_text arrives as kms:... text")
    register_ciphertext(conn)
    with conn.cursor(binary=True) as cur:
        for r in raw:
            cur.execute("INSERT INTO psycopg_archive (id, email, email_bidx, phone, name) VALUES (%b, %b, %b, %b, %b)",
                        (r[0], Ciphertext(r[1]), r[2], Ciphertext(r[3]), r[4]))
    same = conn.execute("""
        SELECT count(*) FROM psycopg_archive a JOIN psycopg_customers c USING (id)
         WHERE a.email::bytea = c.email::bytea AND kms_decrypt(a.email, a.id::text) = kms_decrypt(c.email, c.id::text)""").fetchone()[0]
    check(same == 3, "binary protocol: ciphertext sent back as encrypted_text (its oid) is unchanged and decrypts")
    conn.execute("DELETE FROM psycopg_archive")

    # COPY: plaintext in (then encrypted by INSERT), plaintext and ciphertext out.
    copy_in_plaintext(conn, PEOPLE[11:20])
    out = copy_out_plaintext(conn)
    want = [tuple(p) for p in PEOPLE[:20] if p[0] != 7]
    check(out == want, "COPY plaintext in (temp table) then out (decrypted): 19 rows equal")
    for fmt in ("text", "binary"):
        copy_ciphertext(conn, "psycopg_customers", "psycopg_archive", fmt)
        same = conn.execute("""
            SELECT count(*) FROM psycopg_archive a JOIN psycopg_customers c USING (id)
             WHERE a.email::bytea = c.email::bytea AND kms_decrypt(a.email, a.id::text) = kms_decrypt(c.email, c.id::text)""").fetchone()[0]
        check(same == 19, f"COPY ciphertext out and in ({fmt}): 19 rows unchanged, decrypt")
        conn.execute("DELETE FROM psycopg_archive")


def main():
    with psycopg.connect("") as conn:
        conn.autocommit = True
        for style in styles():
            if style == "explicit":
                explicit(conn)
            elif style == "view":
                import psycopg_view
                psycopg_view.run(conn)
            else:
                raise SystemExit(f"unknown style {style}")
    done("psycopg " + psycopg.__version__)


if __name__ == "__main__":
    main()
