//! Multipart bodies read as Go's `mime/multipart` reads them. Invariants: no panic; every field
//! read from a part that is not quoted-printable is a slice of the body; names are never empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_authz::multipart::{parse_media_type, read_form};

fuzz_target!(|data: &[u8]| {
    // The first line is the content type, the rest is the body.
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (content_type, body) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(media) = parse_media_type(content_type) else {
        return;
    };
    let Some(boundary) = media.params.get("boundary") else {
        return;
    };
    let Ok(fields) = read_form(body, boundary) else {
        return;
    };
    let quoted_printable = body
        .windows(16)
        .any(|w| w.eq_ignore_ascii_case(b"quoted-printable"));
    for field in fields {
        assert!(!field.name.is_empty());
        if !quoted_printable && !field.value.is_empty() {
            assert!(
                body.windows(field.value.len()).any(|w| w == field.value.as_slice()),
                "a field value that is not in the body"
            );
        }
    }
});
