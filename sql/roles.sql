-- pg_kms roles (cluster-wide, so created only when missing). Runs first
-- (bootstrap): every later file may grant to them. What each role may do
-- is declared in grants.sql.
--   kms_user:    seals and opens values under keys it may use
--   kms_admin:   key lifecycle, secrets, re-encryption
--   kms_auditor: reads the views and checks the audit chain (cannot decrypt)
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'kms_admin') THEN
        CREATE ROLE kms_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'kms_user') THEN
        CREATE ROLE kms_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'kms_auditor') THEN
        CREATE ROLE kms_auditor NOLOGIN;
    END IF;
END
$$;
