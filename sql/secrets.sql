-- pg_kms secrets store (kms_secret_set, kms_secret_get, kms_secret_delete;
-- listed by the kms_secrets view).

-- Secrets store: values sealed under a key (no context), so rotation and
-- the background worker cover them.
CREATE TABLE kms.secrets (
    name       text NOT NULL,
    version    integer NOT NULL,
    value      encrypted_text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at timestamptz,
    tags       jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (name, version)
);
SELECT pg_catalog.pg_extension_config_dump('kms.secrets', '');
