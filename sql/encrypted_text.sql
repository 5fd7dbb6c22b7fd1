-- Operators and operator classes of the encrypted_text type. The type, its
-- I/O functions and its casts to and from bytea are in src/api/encrypted_text.rs,
-- which also includes this file.

-- Equality and ordering on the envelope bytes (the representation is the
-- same as bytea's, so PostgreSQL's own bytea functions do the work). With
-- kms_encrypt_deterministic this gives UNIQUE, hash joins and GROUP BY.
CREATE FUNCTION encrypted_text_eq(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteaeq';
CREATE FUNCTION encrypted_text_ne(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteane';
CREATE FUNCTION encrypted_text_lt(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'bytealt';
CREATE FUNCTION encrypted_text_le(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteale';
CREATE FUNCTION encrypted_text_gt(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteagt';
CREATE FUNCTION encrypted_text_ge(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteage';
CREATE FUNCTION encrypted_text_cmp(encrypted_text, encrypted_text) RETURNS integer
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteacmp';
CREATE FUNCTION encrypted_text_hash(encrypted_text) RETURNS integer
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'hashvarlena';

CREATE OPERATOR = (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_eq,
    COMMUTATOR = =, NEGATOR = <>, RESTRICT = eqsel, JOIN = eqjoinsel, HASHES, MERGES);
CREATE OPERATOR <> (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_ne,
    COMMUTATOR = <>, NEGATOR = =, RESTRICT = neqsel, JOIN = neqjoinsel);
CREATE OPERATOR < (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_lt,
    COMMUTATOR = >, NEGATOR = >=, RESTRICT = scalarltsel, JOIN = scalarltjoinsel);
CREATE OPERATOR <= (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_le,
    COMMUTATOR = >=, NEGATOR = >, RESTRICT = scalarlesel, JOIN = scalarlejoinsel);
CREATE OPERATOR > (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_gt,
    COMMUTATOR = <, NEGATOR = <=, RESTRICT = scalargtsel, JOIN = scalargtjoinsel);
CREATE OPERATOR >= (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_ge,
    COMMUTATOR = <=, NEGATOR = <, RESTRICT = scalargesel, JOIN = scalargejoinsel);

CREATE OPERATOR CLASS encrypted_text_ops DEFAULT FOR TYPE encrypted_text USING btree AS
    OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >,
    FUNCTION 1 encrypted_text_cmp(encrypted_text, encrypted_text);
CREATE OPERATOR CLASS encrypted_text_hash_ops DEFAULT FOR TYPE encrypted_text USING hash AS
    OPERATOR 1 =,
    FUNCTION 1 encrypted_text_hash(encrypted_text);
