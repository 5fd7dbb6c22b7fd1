-- Roles: a role without pg_kms roles can neither seal nor read the views.
-- Runs last (see ../schedule).
\set VERBOSITY sqlstate

CREATE ROLE regress_plain;
SET ROLE regress_plain;
SELECT kms_encrypt('x', 'pii');
SELECT * FROM kms_keys;
RESET ROLE;
DROP ROLE regress_plain;
