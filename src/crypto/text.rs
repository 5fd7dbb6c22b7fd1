//! The text form of an `encrypted_text` value: `kms:` followed by the
//! standard base64 (with padding) of the envelope's bytes. It is what
//! `encrypted_text_out` prints, what pg_dump and COPY carry, and what
//! `encrypted_text_in` accepts back: parsing only validates (the envelope's
//! structure), it never encrypts, so a dump and restore can never encrypt
//! twice.

use crate::crypto::envelope::{Envelope, EnvelopeError};
use base64::Engine;

pub const TEXT_PREFIX: &str = "kms:";

/// Why a text is not an `encrypted_text` value (no input bytes in it).
#[derive(Debug, PartialEq, Eq)]
pub enum TextFormError {
    NoPrefix,
    BadBase64,
    Envelope(EnvelopeError),
}

impl std::fmt::Display for TextFormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TextFormError::NoPrefix => write!(f, "value does not start with \"{TEXT_PREFIX}\""),
            TextFormError::BadBase64 => {
                write!(f, "the part after \"{TEXT_PREFIX}\" is not valid base64")
            }
            TextFormError::Envelope(e) => write!(f, "{e}"),
        }
    }
}

/// Parses the text form `kms:<base64 envelope>` into the envelope's bytes.
pub fn parse_text_form(input: &[u8]) -> Result<Vec<u8>, TextFormError> {
    let b64 = input
        .strip_prefix(TEXT_PREFIX.as_bytes())
        .ok_or(TextFormError::NoPrefix)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| TextFormError::BadBase64)?;
    Envelope::parse(&bytes).map_err(TextFormError::Envelope)?;
    Ok(bytes)
}

/// The text form of an envelope's bytes.
pub fn to_text_form(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(TEXT_PREFIX.len() + bytes.len().div_ceil(3) * 4);
    s.push_str(TEXT_PREFIX);
    base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut s);
    s
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::crypto::envelope::{Header, OVERHEAD};
    use proptest::prelude::*;

    proptest! {
        /// The text input function's parser never panics, whatever it is given.
        #[test]
        fn text_input_never_panics(s in "\\PC*") {
            let _ = parse_text_form(s.as_bytes());
        }

        #[test]
        fn text_input_never_panics_on_kms_prefixed_base64(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let t = to_text_form(&bytes);
            let r = parse_text_form(t.as_bytes());
            // Structure decides: a well-formed envelope round-trips, anything else is an error.
            if let Ok(b) = r { prop_assert_eq!(b, bytes); }
        }

        #[test]
        fn text_input_never_panics_on_raw_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut v = b"kms:".to_vec();
            v.extend_from_slice(&bytes);
            let _ = parse_text_form(&v);
        }
    }

    #[test]
    fn text_form_round_trip_and_rejects() {
        let mut env = Header {
            flags: 0,
            key_id: 1,
            key_version: 1,
        }
        .encode()
        .to_vec();
        env.resize(OVERHEAD + 3, 7);
        let t = to_text_form(&env);
        assert!(t.starts_with("kms:"));
        assert_eq!(parse_text_form(t.as_bytes()).unwrap(), env);
        for bad in [
            "",
            "kms:",
            "hello",
            "kms:!!!!",
            "KMS:AAAA",
            "kms:AQ==",
            &t[..t.len() - 8],
            &t.replace("kms:", "kms: "),
        ] {
            assert!(parse_text_form(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
    }
}
