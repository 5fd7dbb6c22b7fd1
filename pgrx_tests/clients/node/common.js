// Shared by the Node.js client programs run by pgrx_tests/tests/clients.rs.
// The connection comes from libpq-style environment variables (PGHOST = the
// cluster's socket directory, PGPORT, PGUSER, PGDATABASE), set by the test.
// Checks print what they checked, never a value.
'use strict';

let passed = 0;

function check(cond, what) {
  if (!cond) {
    console.log(`FAILED: ${what}`);
    process.exit(1);
  }
  passed += 1;
  console.log(`ok: ${what}`);
}

async function sqlstateOf(promise) {
  try {
    await promise;
    return 'ok';
  } catch (e) {
    return (e && (e.code || (e.parent && e.parent.code) || (e.original && e.original.code))) || String(e && e.name);
  }
}

function done(program) {
  console.log(`${program}: all ${passed} checks ok`);
}

function styles() {
  const s = process.argv.slice(2);
  return s.length ? s : ['explicit'];
}

// Runs main() and exits non-zero on any exception (message only: a driver
// error names no parameter values).
function run(main) {
  main().then(
    () => process.exit(0),
    (e) => {
      console.log(`FAILED: ${e && e.code ? `SQLSTATE ${e.code}: ` : ''}${e && e.message}`);
      process.exit(1);
    },
  );
}

module.exports = { check, sqlstateOf, done, styles, run };
