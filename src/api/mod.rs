//! The SQL API: every `#[pg_extern]` of pg_kms and nothing else, one file
//! per SQL area, each ending with its `#[pg_test]`s. Functions here are
//! thin: they convert arguments, call the logic layer and raise its error.

pub mod encrypted_text;
pub mod keys;
pub mod observability;
#[cfg(any(test, feature = "pg_test"))]
mod privileges;
pub mod reencrypt;
pub mod secrets;
#[cfg(any(test, feature = "pg_test"))]
pub mod test_support;
pub mod values;
