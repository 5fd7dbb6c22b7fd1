"""Django 5 ORM against pg_kms, with no project: settings.configure() and
models with an explicit app_label. Run by pgrx_tests/tests/clients.rs as
`python django_app.py [explicit] [view]`; the parts between `# recipe:` and
`# end recipe` are quoted verbatim in docs/clients.md (the test checks that
they match).
"""

import os

import django
from django.conf import settings

from common import check, done, styles

# recipe: django settings
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ["PGHOST"],  # a socket directory works as HOST
            "PORT": os.environ["PGPORT"],
            "NAME": os.environ["PGDATABASE"],
            "USER": os.environ["PGUSER"],
            # Bind parameters server-side: Django's default with psycopg 3
            # interpolates them into the statement text (server logs).
            "OPTIONS": {"server_side_binding": True},
        }
    },
    INSTALLED_APPS=[],
    USE_TZ=True,
)
django.setup()
# end recipe

from django.db import connection  # noqa: E402

# recipe: django explicit
from django.db import models  # noqa: E402
from django.db.models import F, Func, Value  # noqa: E402


class EncryptedTextField(models.TextField):
    """A str attribute stored as encrypted_text under key 'pii': written
    through kms_encrypt(%s, 'pii'), selected through kms_decrypt()."""

    def db_type(self, connection):
        return "encrypted_text"

    def get_placeholder(self, value, compiler, connection):  # INSERT and UPDATE
        return "kms_encrypt(%s, 'pii')"

    def select_format(self, compiler, sql, params):  # SELECT lists only
        return f"kms_decrypt({sql})", params


class BlindIndexField(models.BinaryField):
    """kms_blind_index() of another field's plaintext, filled on save()
    (not by QuerySet.update() or bulk_update())."""

    def __init__(self, *args, source, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        return name, path, args, {**kwargs, "source": self.source}

    def pre_save(self, model_instance, add):
        return getattr(model_instance, self.source)

    def get_db_prep_value(self, value, connection, prepared=False):
        return value  # the plaintext, only ever a bind parameter

    def get_placeholder(self, value, compiler, connection):
        return "kms_blind_index(%s, 'pii', NULL, 64)"


def blind_index(value):
    return Func(Value(value), Value("pii"), Value(None), Value(64),
                function="kms_blind_index", output_field=models.BinaryField())


def decrypted(field):
    return Func(F(field), function="kms_decrypt", output_field=models.TextField())


class Customer(models.Model):
    id = models.BigAutoField(primary_key=True)  # identity
    email = EncryptedTextField()
    email_bidx = BlindIndexField(source="email")
    phone = EncryptedTextField(null=True)
    name = models.TextField(null=True)

    class Meta:
        app_label = "shop"
        db_table = "django_customers"
        managed = False


def find_by_email(email):
    return (Customer.objects.filter(email_bidx=blind_index(email))  # index scan
            .alias(plain=decrypted("email")).filter(plain=email)  # recheck
            .first())
# end recipe


def explicit():
    Customer.objects.all().delete()
    c = Customer(email="user1@example.com", phone="+1 555 0301", name="User 1")
    c.save()
    check(isinstance(c.id, int), "save(): identity id read back")
    made = Customer.objects.bulk_create(
        [Customer(email=f"user{i}@example.com", phone=f"+1 555 03{i:02d}", name=f"User {i}") for i in range(2, 11)])
    check(all(isinstance(m.id, int) for m in made) and len({m.id for m in made}) == 9,
          "bulk_create: 9 rows, ids read back (RETURNING)")
    got = list(Customer.objects.order_by("id").values_list("email", "phone", "name"))
    check(got == [(f"user{i}@example.com", f"+1 555 03{i:02d}", f"User {i}") for i in range(1, 11)],
          "values_list: decrypted")
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM django_customers WHERE kms_key_name(email) = 'pii' AND email_bidx IS NOT NULL")
        check(cur.fetchone()[0] == 10, "stored as encrypted_text under pii, blind index filled by pre_save")
    c5 = find_by_email("user5@example.com")
    check(c5 is not None and c5.name == "User 5" and c5.email == "user5@example.com", "blind-index lookup returns the decrypted model")
    check(find_by_email("nobody@example.com") is None, "lookup of an unknown value finds nothing")
    c5.email = "five@example.org"
    c5.save()
    check(find_by_email("five@example.org").id == c5.id and find_by_email("user5@example.com") is None,
          "save() of a changed value: new value found, old not")
    Customer.objects.get(pk=c5.pk).delete()
    check(Customer.objects.count() == 9, "delete")
    check(Customer.objects.get(pk=c.id).email == "user1@example.com", "get(pk=...) decrypts")


def main():
    for style in styles():
        if style == "explicit":
            explicit()
        elif style == "view":
            import django_view
            django_view.run()
        else:
            raise SystemExit(f"unknown style {style}")
    done("Django " + django.get_version())


if __name__ == "__main__":
    main()
