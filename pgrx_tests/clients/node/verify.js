// What the view style stored, checked by the Node.js programs: test code,
// not application code (it calls pg_kms functions to look at the table
// behind the view). STORED(table) selects good (rows whose email and phone
// are encrypted under 'pii' with the row's id as context and whose blind
// index is right) and total.
'use strict';

const STORED = (table) => `
  SELECT count(*) FILTER (WHERE kms_key_name(email) = 'pii'
                            AND kms_decrypt(email, id::text) IS NOT NULL
                            AND email_bidx = kms_blind_index(kms_decrypt(email, id::text), 'pii', NULL, 64)
                            AND (phone IS NULL OR kms_decrypt(phone, id::text) IS NOT NULL)) AS good,
         count(*) AS total
    FROM ${table}`;

module.exports = { STORED };
