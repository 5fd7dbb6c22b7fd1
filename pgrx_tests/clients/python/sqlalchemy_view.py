"""SQLAlchemy 2 ORM on the decrypted view (`sqlalchemy_app.py view`): the
model is a plain model of sqlalchemy_accounts_decrypted."""

from sqlalchemy import text

from common import check
from verify import STORED

# recipe: sqlalchemy view
from sqlalchemy import BigInteger, func, literal_column, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class ViewBase(DeclarativeBase):
    pass


class Account(ViewBase):
    __tablename__ = "sqlalchemy_accounts_decrypted"  # the view pg_kms made
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str]
    phone: Mapped[str | None]
    name: Mapped[str | None]


def find_by_email(session, email):  # indexed: the blind index, then the recheck
    return session.scalars(select(Account).where(
        literal_column("email_bidx") == func.kms_blind_index(email, "pii", None, 64),
        Account.email == email)).one_or_none()
# end recipe


def stored(s):
    return tuple(s.execute(text(STORED.format(table="sqlalchemy_accounts"))).one())


def run(engine):
    with Session(engine) as s:
        s.execute(text("DELETE FROM sqlalchemy_accounts_decrypted"))
        a = Account(email="b1@example.com", phone="+1 555 0801", name="B 1")
        s.add(a)
        s.commit()
        check(isinstance(a.id, int), "add + commit: identity id read back")
        many = [Account(email=f"b{i}@example.com", phone=f"+1 555 08{i:02d}", name=f"B {i}") for i in range(2, 11)]
        s.add_all(many)
        s.commit()
        ids = {m.email: m.id for m in many}
        check(len(set(ids.values())) == 9 and all(isinstance(i, int) for i in ids.values()), "add_all: 9 rows, ids read back")
        check(stored(s) == (10, 10), "all 10 rows stored encrypted with their id as context, blind index filled")
    with Session(engine) as s:
        got = s.scalars(select(Account).order_by(Account.id)).all()
        check([(x.email, x.phone, x.name) for x in got] ==
              [(f"b{i}@example.com", f"+1 555 08{i:02d}", f"B {i}") for i in range(1, 11)],
              "select entities: decrypted, in id order")
        check({x.email: x.id for x in got[1:]} == ids, "the ids add_all read back are those of their rows")
        x = s.scalars(select(Account).where(Account.email == "b4@example.com")).one()
        check(x.name == "B 4", "where Account.email == ...: found (a scan of the view)")
        check(find_by_email(s, "b4@example.com") is x, "indexed lookup (blind index, then recheck)")
        check(find_by_email(s, "nobody@example.com") is None, "indexed lookup of an unknown value finds nothing")
        x.email = "four@example.org"
        x.phone = None
        s.commit()
        s.expire_all()
        y = s.get(Account, x.id)
        check((y.email, y.phone) == ("four@example.org", None), "update through the ORM")
        s.delete(y)
        s.commit()
        check(s.get(Account, x.id) is None, "delete through the ORM")
        check(stored(s) == (9, 9), "after update and delete: 9 rows, all stored right")
