//! Master-key rotation: every wrapped key and index root rewrapped, every
//! row re-MAC'd, under the new master key, in one transaction.

use super::*;
use crate::catalog;
use crate::crypto::integrity;
use crate::crypto::MasterKey;
use crate::errors::KmsError;
use crate::keys::audit::{append, audit};
use crate::keys::integrity::*;
use crate::keys::{self, Which};
use crate::pg::datum::RawText;
use crate::pg::spi;

/// The body of SQL `kms_rotate_master_key()`.
pub fn rotate_master_key() -> i64 {
    lifecycle(|| {
        let new = keys::load_master_key(Which::Current)?;
        let stored = catalog::rows::stored_fingerprint(true)?;
        let Some(stored) = stored else {
            // Nothing was ever wrapped: just commit to the new key.
            audit(
                "rotate_master_key",
                None,
                None,
                Some(RawText::from_ascii("0 versions re-wrapped")),
            )?;
            return Ok(0);
        };
        if stored == new.fingerprint() {
            return Ok(0);
        }
        let old: MasterKey = keys::load_master_key(Which::Previous)?;
        keys::check_commitment(&old, Some(&stored), Which::Previous)?;
        let (old_keys, new_keys) = (old.integrity_keys(), new.integrity_keys());
        // Authentic under the old key, or a keyring from before MACs that may adopt them.
        match read_keyring(true)? {
            Some(KeyringRow {
                since_us: Some(since),
                mac,
                fp,
            }) => {
                if !mac
                    .as_deref()
                    .is_some_and(|m| old_keys.row.verify(&integrity::keyring_row(&fp, since), m))
                {
                    return Err(altered("the kms.keyring row".into(), WHY_MAC));
                }
                verify_all_keys(&old_keys, &old.fingerprint())?;
            }
            _ => refuse_unkeyed_with_keyed_chain()?,
        }
        let (old_kek, new_kek) = (old.kek(), new.kek());
        let rows = catalog::rows::wrapped_versions_for_update()?;
        for catalog::rows::WrappedRow {
            key_id,
            key_name: name,
            version,
            wrapped,
        } in &rows
        {
            let dk = old_kek
                .unwrap_raw(*key_id as u32, *version as u32, wrapped)
                .map_err(|_| KmsError::CatalogCorrupt {
                    key: name.clone(),
                    version: *version,
                })?;
            let mut nonce = [0u8; 12];
            keys::random_bytes(&mut nonce)?;
            let rewrapped = new_kek.wrap(*key_id as u32, *version as u32, &dk, &nonce);
            spi::exec(
                "UPDATE kms.key_versions SET wrapped_key = $3 WHERE key_id = $1 AND version = $2",
                &[(*key_id).into(), (*version).into(), rewrapped.into()],
            )?;
        }
        let roots = catalog::rows::wrapped_index_roots()?;
        for catalog::rows::WrappedRow {
            key_id,
            key_name: name,
            wrapped,
            ..
        } in &roots
        {
            let root = old_kek
                .unwrap_index_root(*key_id as u32, wrapped)
                .map_err(|_| KmsError::CatalogCorrupt {
                    key: name.clone(),
                    version: 0,
                })?;
            let mut nonce = [0u8; 12];
            keys::random_bytes(&mut nonce)?;
            spi::exec(
                "UPDATE kms.keys SET index_key = $2 WHERE key_id = $1",
                &[
                    (*key_id).into(),
                    new_kek
                        .wrap_index_root(*key_id as u32, &root, &nonce)
                        .into(),
                ],
            )?;
        }
        let new_fp = new.fingerprint();
        spi::exec(
            "UPDATE kms.keyring SET master_key_fingerprint = $1, rotated_at = pg_catalog.now(),
                    integrity_since = coalesce(integrity_since, pg_catalog.now())",
            &[new_fp.to_vec().into()],
        )?;
        seal_keyring(&new_keys)?;
        let n = rows.len() as i64;
        let reason = RawText::from_ascii(&format!("{n} versions re-wrapped"));
        let id = append(
            &new_keys,
            &new_fp,
            "rotate_master_key",
            None,
            None,
            Some(reason),
            None,
        )?;
        reseal_all(&new_keys, id)?;
        Ok(n)
    })
}
