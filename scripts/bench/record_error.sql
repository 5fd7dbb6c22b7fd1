-- bench.sh: records that a section failed (the report prints the message in
-- place of its figures). psql variables: name (error_<section>), msg.
INSERT INTO bench.facts VALUES (:'name', :'msg') ON CONFLICT (name) DO NOTHING;
