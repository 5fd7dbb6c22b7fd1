//! The access audit's harvest: the database's worker appends the access
//! counts gathered in shared memory to `kms.access_log` at most every
//! `pg_kms.access_audit_interval`, and once more when it stops.

use super::xact_kms;
use crate::pg::{access_shmem, guc};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// When the worker last appended the counts.
#[derive(Default)]
pub(super) struct Harvest {
    last: Option<Instant>,
}

fn interval() -> Duration {
    Duration::from_millis(guc::ACCESS_AUDIT_INTERVAL_MS.get().max(100) as u64)
}

impl Harvest {
    /// Appends the counts if the interval has passed (`now`: in any case,
    /// at shutdown). A failed append keeps them in shared memory for the
    /// next try.
    pub(super) fn tick(&mut self, now: bool) {
        if !now && self.last.is_some_and(|t| t.elapsed() < interval()) {
            return;
        }
        self.last = Some(Instant::now());
        match xact_kms(|| {
            // The counts leave shared memory once this commits: make it
            // durable first (the worker otherwise commits asynchronously),
            // so that a crash loses at most the current interval.
            crate::pg::spi::exec("SET LOCAL synchronous_commit = on", &[])?;
            crate::keys::access_log::append_counts()
        }) {
            // Committed: take what was written off shared memory.
            Ok(written) => access_shmem::subtract(&written),
            Err(e) => warning!("pg_kms: could not append to the access log: {e}"),
        }
    }

    /// How long the worker may sleep before the next append is due.
    pub(super) fn until_next(&self) -> Duration {
        match self.last {
            Some(t) => interval().saturating_sub(t.elapsed()),
            None => Duration::ZERO,
        }
        .max(Duration::from_millis(10))
    }
}
