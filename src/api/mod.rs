//! The SQL API: every `#[pg_extern]` of pg_kms and nothing else, one file
//! per SQL area, each ending with its `#[pg_test]`s. Functions here are
//! thin: each calls the logic function named like it without `kms_`
//! (`_sql` where that name already belongs to the lower-level function the
//! body wraps, e.g. `lifecycle::create_key_sql` around `create_key`;
//! `_of` for the header readers), which converts arguments and raises its
//! error.

pub mod encrypted_text;
pub mod keys;
pub mod legacy;
pub mod observability;
#[cfg(any(test, feature = "pg_test"))]
mod privileges;
pub mod protect;
#[cfg(any(test, feature = "pg_test"))]
mod protect_attack_tests;
pub mod reencrypt;
pub mod secrets;
pub mod sync;
#[cfg(any(test, feature = "pg_test"))]
pub mod test_support;
pub mod values;
