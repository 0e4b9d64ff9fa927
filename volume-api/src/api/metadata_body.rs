//! The request-body rules Cinder applies to every metadata endpoint (volumes and snapshots
//! alike): what a merge or replace produces, what a single-item PUT may carry, and the faults for
//! missing items and the item limit. Pure: the handlers load and store the record.

use super::{body_object, metadata, only_keys};
use crate::constants::METADATA_ITEMS_MAX;
use crate::fault::Fault;
use crate::model::Metadata;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;

fn over_limit() -> Fault {
    Fault::OverLimit("Maximum number of metadata items exceeded.".into())
}

/// The metadata after a `POST` (merge) or `PUT` (replace) of `{"metadata": {...}}`.
pub fn merged(
    current: &Metadata,
    body: Result<Bytes, BytesRejection>,
    replace: bool,
) -> Result<Metadata, Fault> {
    let mut body = body_object(body)?;
    only_keys(&body, &["metadata"])?;
    let meta = metadata(body.remove("metadata").as_ref(), "metadata")?.ok_or_else(|| {
        Fault::BadRequest("Missing required element 'metadata' in request body.".into())
    })?;
    let mut merged = if replace { Metadata::new() } else { current.clone() };
    merged.extend(meta);
    if merged.len() > METADATA_ITEMS_MAX {
        return Err(over_limit());
    }
    Ok(merged)
}

/// The value a `PUT .../metadata/{key}` with `{"meta": {key: value}}` sets.
pub fn item_value(
    current: &Metadata,
    key: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, Fault> {
    let mut body = body_object(body)?;
    only_keys(&body, &["meta"])?;
    let meta = metadata(body.remove("meta").as_ref(), "meta")?.ok_or_else(|| {
        Fault::BadRequest("Missing required element 'meta' in request body.".into())
    })?;
    let Some(value) = meta.get(key).filter(|_| meta.len() == 1) else {
        return Err(Fault::BadRequest("Request body and URI mismatch".into()));
    };
    if !current.contains_key(key) && current.len() >= METADATA_ITEMS_MAX {
        return Err(over_limit());
    }
    Ok(value.clone())
}

/// The item's value, or Cinder's 404 for a missing key.
pub fn existing<'a>(current: &'a Metadata, key: &str) -> Result<&'a String, Fault> {
    current
        .get(key)
        .ok_or_else(|| Fault::NotFound(format!("Metadata item was not found with key {key}.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(text: &str) -> Result<Bytes, BytesRejection> {
        Ok(Bytes::from(text.to_owned()))
    }

    fn current() -> Metadata {
        Metadata::from([("a".to_owned(), "1".to_owned())])
    }

    #[test]
    fn merge_keeps_and_replace_drops_existing_items() {
        let merged = merged(&current(), body(r#"{"metadata": {"b": "2"}}"#), false).unwrap();
        assert_eq!(merged.len(), 2);
        let replaced =
            super::merged(&current(), body(r#"{"metadata": {"b": "2"}}"#), true).unwrap();
        assert_eq!(replaced, Metadata::from([("b".to_owned(), "2".to_owned())]));
    }

    #[test]
    fn bad_bodies_get_cinders_faults() {
        let cases = [
            (r#"{}"#, "Missing required element 'metadata'"),
            (r#"{"metadata": {"b": "2"}, "x": 1}"#, ""),
            (r#"{"metadata": {"b": 2}}"#, ""),
        ];
        for (text, message) in cases {
            let fault = merged(&current(), body(text), false).expect_err(text);
            assert!(matches!(fault, Fault::BadRequest(_)), "{text}: {fault:?}");
            assert!(format!("{fault:?}").contains(message), "{text}: {fault:?}");
        }
        let many: String = (0..=METADATA_ITEMS_MAX).map(|i| format!("\"k{i}\": \"v\",")).collect();
        let text = format!("{{\"metadata\": {{{}}}}}", many.trim_end_matches(','));
        assert!(matches!(merged(&Metadata::new(), body(&text), true), Err(Fault::OverLimit(_))));
    }

    #[test]
    fn item_put_must_name_exactly_the_uri_key() {
        assert_eq!(item_value(&current(), "b", body(r#"{"meta": {"b": "2"}}"#)).unwrap(), "2");
        for text in [r#"{"meta": {"c": "2"}}"#, r#"{"meta": {"b": "2", "c": "3"}}"#] {
            let fault = item_value(&current(), "b", body(text)).expect_err(text);
            assert!(format!("{fault:?}").contains("mismatch"), "{text}: {fault:?}");
        }
        assert!(matches!(existing(&current(), "zz"), Err(Fault::NotFound(_))));
        assert_eq!(existing(&current(), "a").unwrap(), "1");
    }
}
