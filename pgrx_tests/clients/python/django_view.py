"""Django 5 ORM on the decrypted view (`django_app.py view`, after the
settings of django_app.py): a plain unmanaged model of
django_accounts_decrypted."""

from django.db import connection

from common import check
from verify import STORED

# recipe: django view
from django.db import models
from django.db.models import F
from django.db.models.expressions import RawSQL


class Account(models.Model):
    id = models.BigAutoField(primary_key=True)
    email = models.TextField()
    phone = models.TextField(null=True)
    name = models.TextField(null=True)

    class Meta:
        app_label = "shop"
        db_table = "django_accounts_decrypted"  # the view pg_kms made
        managed = False


def find_by_email(email):  # indexed: the blind index, then the recheck
    return (Account.objects
            .alias(bidx=RawSQL("email_bidx", (), output_field=models.BinaryField()),
                   key=RawSQL("kms_blind_index(%s, 'pii', NULL, 64)", (email,), output_field=models.BinaryField()))
            .filter(bidx=F("key"), email=email).first())
# end recipe


def stored():
    with connection.cursor() as cur:
        cur.execute(STORED.format(table="django_accounts"))
        return tuple(cur.fetchone())


def run():
    Account.objects.all().delete()
    a = Account.objects.create(email="c1@example.com", phone="+1 555 0901", name="C 1")
    check(isinstance(a.id, int), "objects.create: identity id read back (RETURNING)")
    made = Account.objects.bulk_create(
        [Account(email=f"c{i}@example.com", phone=f"+1 555 09{i:02d}", name=f"C {i}") for i in range(2, 11)])
    check(len({m.id for m in made}) == 9 and all(isinstance(m.id, int) for m in made), "bulk_create: 9 rows, ids read back")
    check({m.email: m.id for m in made} == dict(Account.objects.exclude(pk=a.pk).values_list("email", "id")),
          "the ids bulk_create read back are those of their rows")
    check(stored() == (10, 10), "all 10 rows stored encrypted with their id as context, blind index filled")
    got = list(Account.objects.order_by("id").values_list("email", "phone", "name"))
    check(got == [(f"c{i}@example.com", f"+1 555 09{i:02d}", f"C {i}") for i in range(1, 11)], "values_list: decrypted")
    c4 = Account.objects.get(email="c4@example.com")
    check(c4.name == "C 4", "get(email=...): found (a scan of the view)")
    check(find_by_email("c4@example.com").pk == c4.pk, "indexed lookup (blind index, then recheck)")
    check(find_by_email("nobody@example.com") is None, "indexed lookup of an unknown value finds nothing")
    c4.email = "four@example.org"
    c4.save()
    check(Account.objects.get(pk=c4.pk).email == "four@example.org", "save() of a changed value (UPDATE by primary key)")
    n = Account.objects.filter(pk__in=[m.id for m in made[:3]]).update(name="renamed")
    check(n == 3, "QuerySet.update(): 3 rows")
    Account.objects.filter(pk=c4.pk).delete()
    check(Account.objects.count() == 9, "delete")
    check(stored() == (9, 9), "after updates and delete: 9 rows, all stored right")
