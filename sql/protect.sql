-- Protected columns (kms_protect_column): one row per column whose values
-- pg_kms seals by policy, and the decrypted view it keeps for the table.
-- The table is named by regclass (dumped as its name, so a restore binds
-- the policy to the restored table; pg_upgrade keeps table oids) and the
-- column by name: renaming either, or a column the context reads, is
-- refused while the policy exists (the event trigger below).
CREATE TABLE kms.protected_columns (
    relid              pg_catalog.regclass NOT NULL,
    attname            name NOT NULL,
    -- The table's name and schema when protected: a rename is refused.
    relname            name NOT NULL,
    relnamespace       name NOT NULL,
    key_id             integer NOT NULL,
    -- The context expression over the row's own columns, as PostgreSQL
    -- deparses it (NULL: no context), and the columns it reads.
    context            text,
    context_columns    name[] NOT NULL DEFAULT '{}',
    deterministic      boolean NOT NULL DEFAULT false,
    blind_index_bits   integer CHECK (blind_index_bits BETWEEN 16 AND 256 AND blind_index_bits % 8 = 0),
    blind_index_column name,
    -- The plaintext column's type while it is converted ('text',
    -- 'character varying(64)', 'bytea'); NULL for a column that was
    -- encrypted_text already.
    source_type        text,
    -- While converting: the encrypted_text column being filled.
    shadow_column      name,
    view_name          name NOT NULL,
    state              text NOT NULL CHECK (state IN ('converting', 'protected')),
    -- Online conversion progress (see the kms_protected_columns view).
    rows_done          bigint NOT NULL DEFAULT 0,
    rows_total         bigint,
    resume_at          text,
    started_at         timestamptz,
    last_batch_at      timestamptz,
    finished_at        timestamptz,
    last_error         text,
    protected_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    protected_by       text NOT NULL,
    PRIMARY KEY (relid, attname),
    CHECK ((state = 'converting') = (shadow_column IS NOT NULL))
);
SELECT pg_catalog.pg_extension_config_dump('kms.protected_columns', '');

-- Refuses DDL that would strand protected values: dropping or renaming a
-- protected table or column, its blind-index or shadow column or a column
-- its context reads, changing their types, disabling or dropping the
-- conversion trigger. pg_kms's own DDL is let through.
CREATE FUNCTION kms.protect_ddl_guard() RETURNS event_trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'kms_protect_ddl_guard_wrapper';
CREATE EVENT TRIGGER kms_protect_ddl_end ON ddl_command_end
    EXECUTE FUNCTION kms.protect_ddl_guard();
CREATE EVENT TRIGGER kms_protect_sql_drop ON sql_drop
    EXECUTE FUNCTION kms.protect_ddl_guard();

-- The policies, and the progress of online conversions: rows_left and eta
-- are estimates (rows_total is counted when the conversion starts).
CREATE VIEW kms_protected_columns AS
SELECT p.relid AS table_name,
       p.attname AS column_name,
       k.key_name,
       p.context,
       p.deterministic,
       p.blind_index_bits,
       p.blind_index_column,
       p.view_name,
       p.state,
       p.rows_done,
       CASE WHEN p.state = 'converting' THEN GREATEST(p.rows_total - p.rows_done, 0) ELSE 0 END AS rows_left,
       p.started_at,
       p.last_batch_at,
       CASE WHEN p.state = 'converting' AND p.rows_done > 0 AND p.rows_total IS NOT NULL
                 AND p.last_batch_at > p.started_at
            THEN p.last_batch_at + (p.last_batch_at - p.started_at)
                 * (GREATEST(p.rows_total - p.rows_done, 0)::float8 / p.rows_done) END AS eta,
       p.finished_at,
       p.last_error,
       p.protected_at,
       p.protected_by
  FROM kms.protected_columns p JOIN kms.keys k ON k.key_id = p.key_id;
COMMENT ON VIEW kms_protected_columns IS 'Column policies (kms_protect_column) and the progress of online encryption of plaintext columns (state converting, then protected).';
