-- bench_oltp.sh and bench_oltp_instructions.sh: the point-read/write tables.
-- psql variable: rows. p holds plaintext, e the same rows encrypted under
-- key 'pii' (both with a primary key on id).
CREATE EXTENSION pg_kms;
SELECT kms_create_key('pii') \gset
CREATE TABLE p (id int PRIMARY KEY, email text, phone text, ssn text);
INSERT INTO p SELECT g, 'user' || g || '@example.com', '+1555' || lpad(g::text, 7, '0'), lpad(g::text, 9, '0')
  FROM generate_series(1, :rows) g;
CREATE TABLE e (id int PRIMARY KEY, email encrypted_text, phone encrypted_text, ssn encrypted_text);
INSERT INTO e SELECT id, kms_encrypt(email, 'pii'), kms_encrypt(phone, 'pii'), kms_encrypt(ssn, 'pii') FROM p;
