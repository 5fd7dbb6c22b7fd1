//! The secrets store in SQL: `kms_secret_set/get/delete`.

use crate::pg::datum::{OutText, RawText};
use pgrx::datum::Interval;
use pgrx::prelude::*;

#[pg_extern(volatile, parallel_unsafe)]
fn kms_secret_set(
    name: Option<RawText>,
    value: Option<RawText>,
    key_name: default!(Option<RawText>, "NULL"),
    ttl: default!(Option<Interval>, "NULL"),
    tags: default!(Option<pgrx::JsonB>, "'{}'"),
) -> i32 {
    crate::secrets::secret_set(name, value, key_name, ttl, tags)
}

/// Reads a secret. Permission comes first: for a caller who is neither a
/// kms_admin member nor granted 'decrypt' on the secret's key, an unknown
/// secret (or version), an expired one and a forbidden one give the same
/// error, so nothing about a secret is revealed to who may not read it.
#[pg_extern(stable, parallel_unsafe)]
fn kms_secret_get(
    name: Option<RawText>,
    version: default!(Option<i32>, "NULL"),
) -> Option<OutText> {
    crate::secrets::secret_get(name, version)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_secret_delete(name: Option<RawText>) -> i64 {
    crate::secrets::secret_delete(name)
}
