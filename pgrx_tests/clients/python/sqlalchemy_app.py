"""SQLAlchemy 2 ORM (psycopg 3 driver) against pg_kms. Run by
pgrx_tests/tests/clients.rs as `python sqlalchemy_app.py [explicit] [view]`;
the parts between `# recipe:` and `# end recipe` are quoted verbatim in
docs/clients.md (the test checks that they match).
"""

import sqlalchemy
from sqlalchemy import create_engine, text

from common import check, done, styles

# recipe: sqlalchemy explicit
from sqlalchemy import BigInteger, LargeBinary, Text, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator


class Encrypted(TypeDecorator):
    """A str attribute stored as encrypted_text under key 'pii': the bound
    value is wrapped in kms_encrypt(), the selected column in kms_decrypt()."""

    impl = Text
    cache_ok = True

    def bind_expression(self, bindvalue):
        return func.kms_encrypt(bindvalue, "pii")

    def column_expression(self, col):
        return func.kms_decrypt(col, type_=Text)


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "sqlalchemy_customers"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # identity
    email: Mapped[str] = mapped_column(Encrypted)
    email_bidx: Mapped[bytes] = mapped_column(LargeBinary)
    phone: Mapped[str | None] = mapped_column(Encrypted)
    name: Mapped[str | None]


@event.listens_for(Customer, "before_insert")
@event.listens_for(Customer, "before_update")
def _blind_index(mapper, connection, target):
    # Not called by Core insert()/update() nor bulk_insert_mappings().
    target.email_bidx = func.kms_blind_index(target.email, "pii", None, 64)


def find_by_email(session, email):
    return session.scalars(
        select(Customer).where(
            Customer.email_bidx == func.kms_blind_index(email, "pii", None, 64),  # index scan
            func.kms_decrypt(Customer.email) == email,  # recheck
        )
    ).one_or_none()
# end recipe


def explicit(engine):
    with Session(engine) as s:
        s.execute(text("DELETE FROM sqlalchemy_customers"))
        people = [Customer(email=f"user{i}@example.com", phone=f"+1 555 02{i:02d}", name=f"User {i}") for i in range(1, 11)]
        s.add_all(people)
        s.commit()
        ids = [c.id for c in people]
        check(len(set(ids)) == 10 and all(isinstance(i, int) for i in ids), "add_all: 10 rows, identity ids read back")
    with Session(engine) as s:
        got = s.scalars(select(Customer).order_by(Customer.id)).all()
        check([(c.email, c.phone, c.name) for c in got] ==
              [(f"user{i}@example.com", f"+1 555 02{i:02d}", f"User {i}") for i in range(1, 11)],
              "select entities: attributes decrypted")
        raw = s.execute(text("SELECT count(*) FROM sqlalchemy_customers WHERE kms_key_name(email) = 'pii' AND email_bidx IS NOT NULL")).scalar()
        check(raw == 10, "stored as encrypted_text under pii, blind index filled by the hook")
        c = find_by_email(s, "user4@example.com")
        check(c is not None and c.id == ids[3], "blind-index lookup")
        check(find_by_email(s, "nobody@example.com") is None, "lookup of an unknown value finds nothing")
        c.email = "four@example.org"
        s.commit()
        check(find_by_email(s, "four@example.org").id == ids[3] and find_by_email(s, "user4@example.com") is None,
              "update: new value found by the blind index, old not")
        s.delete(find_by_email(s, "four@example.org"))
        s.commit()
        check(s.execute(text("SELECT count(*) FROM sqlalchemy_customers")).scalar() == 9, "delete")
        one = s.get(Customer, ids[0])
        check(one.email == "user1@example.com", "session.get by primary key decrypts")


def main():
    engine = create_engine("postgresql+psycopg://")
    for style in styles():
        if style == "explicit":
            explicit(engine)
        elif style == "view":
            import sqlalchemy_view
            sqlalchemy_view.run(engine)
        else:
            raise SystemExit(f"unknown style {style}")
    done("SQLAlchemy " + sqlalchemy.__version__)


if __name__ == "__main__":
    main()
