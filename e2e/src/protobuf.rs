//! Decodes the protobuf bodies kubectl sends for imperative creates of core kinds (`kubectl create namespace`,
//! `create configmap`, `create secret`, `create serviceaccount`). Other kinds are refused with a hint to use
//! `kubectl apply`, which always sends JSON.

use base64::Engine;
use serde_json::{Map, Value, json};

/// Magic prefix of Kubernetes' protobuf envelope (`runtime.Unknown`).
const MAGIC: &[u8] = b"k8s\x00";

/// One protobuf field: number and payload.
enum Field<'a> {
    Varint(u32, u64),
    Bytes(u32, &'a [u8]),
}

fn fields(mut buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (tag, rest) = varint(buf)?;
        buf = rest;
        let number = u32::try_from(tag >> 3).map_err(|_| "field number out of range".to_owned())?;
        match tag & 7 {
            0 => {
                let (v, rest) = varint(buf)?;
                buf = rest;
                out.push(Field::Varint(number, v));
            }
            2 => {
                let (len, rest) = varint(buf)?;
                let len = usize::try_from(len).map_err(|_| "length out of range".to_owned())?;
                if rest.len() < len {
                    return Err("truncated length-delimited field".into());
                }
                out.push(Field::Bytes(number, &rest[..len]));
                buf = &rest[len..];
            }
            1 => buf = buf.get(8..).ok_or("truncated fixed64 field")?,
            5 => buf = buf.get(4..).ok_or("truncated fixed32 field")?,
            other => return Err(format!("unsupported wire type {other}")),
        }
    }
    Ok(out)
}

fn varint(buf: &[u8]) -> Result<(u64, &[u8]), String> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, &buf[i + 1..]));
        }
    }
    Err("malformed varint".into())
}

fn text(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "string field is not UTF-8".to_owned())
}

/// A `map<string, string>` (or bytes, base64-encoded as in JSON) entry.
fn map_entry(bytes: &[u8], binary: bool) -> Result<(String, Value), String> {
    let (mut key, mut value) = (String::new(), Value::String(String::new()));
    for field in fields(bytes)? {
        match field {
            Field::Bytes(1, k) => key = text(k)?,
            Field::Bytes(2, v) if binary => {
                value = Value::String(base64::engine::general_purpose::STANDARD.encode(v));
            }
            Field::Bytes(2, v) => value = Value::String(text(v)?),
            _ => {}
        }
    }
    Ok((key, value))
}

fn insert_map_entry(
    obj: &mut Map<String, Value>,
    field: &str,
    bytes: &[u8],
    binary: bool,
) -> Result<(), String> {
    let (k, v) = map_entry(bytes, binary)?;
    if let Some(map) = obj
        .entry(field)
        .or_insert_with(|| json!({}))
        .as_object_mut()
    {
        map.insert(k, v);
    }
    Ok(())
}

fn push_string(obj: &mut Map<String, Value>, field: &str, bytes: &[u8]) -> Result<(), String> {
    if let Some(list) = obj.entry(field).or_insert_with(|| json!([])).as_array_mut() {
        list.push(Value::String(text(bytes)?));
    }
    Ok(())
}

fn object_meta(bytes: &[u8]) -> Result<Value, String> {
    let mut meta = Map::new();
    for field in fields(bytes)? {
        match field {
            Field::Bytes(1, v) => _ = meta.insert("name".into(), Value::String(text(v)?)),
            Field::Bytes(2, v) => _ = meta.insert("generateName".into(), Value::String(text(v)?)),
            Field::Bytes(3, v) => _ = meta.insert("namespace".into(), Value::String(text(v)?)),
            Field::Bytes(11, v) => insert_map_entry(&mut meta, "labels", v, false)?,
            Field::Bytes(12, v) => insert_map_entry(&mut meta, "annotations", v, false)?,
            Field::Bytes(14, v) => push_string(&mut meta, "finalizers", v)?,
            // Server-owned or rarely sent on create; ignored like unknown fields.
            _ => {}
        }
    }
    Ok(Value::Object(meta))
}

/// Decodes a protobuf request body into the JSON object it stands for.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or("missing the k8s protobuf envelope")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for field in fields(envelope)? {
        match field {
            Field::Bytes(1, type_meta) => {
                for f in fields(type_meta)? {
                    match f {
                        Field::Bytes(1, v) => api_version = text(v)?,
                        Field::Bytes(2, v) => kind = text(v)?,
                        _ => {}
                    }
                }
            }
            Field::Bytes(2, bytes) => raw = bytes,
            _ => {}
        }
    }
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), Value::String(api_version.clone()));
    obj.insert("kind".into(), Value::String(kind.clone()));
    let supported = matches!(
        kind.as_str(),
        "Namespace" | "ConfigMap" | "Secret" | "ServiceAccount"
    );
    if api_version != "v1" || !supported {
        return Err(format!(
            "the sandbox decodes protobuf only for core Namespace, ConfigMap, Secret and ServiceAccount, not {api_version}/{kind}; use `kubectl apply -f`, which sends JSON"
        ));
    }
    for field in fields(raw)? {
        match (kind.as_str(), field) {
            (_, Field::Bytes(1, meta)) => _ = obj.insert("metadata".into(), object_meta(meta)?),
            ("Namespace", Field::Bytes(2, spec)) => {
                let mut spec_obj = Map::new();
                for f in fields(spec)? {
                    if let Field::Bytes(1, v) = f {
                        push_string(&mut spec_obj, "finalizers", v)?;
                    }
                }
                obj.insert("spec".into(), Value::Object(spec_obj));
            }
            ("ConfigMap", Field::Bytes(2, entry)) => {
                insert_map_entry(&mut obj, "data", entry, false)?
            }
            ("ConfigMap", Field::Bytes(3, entry)) => {
                insert_map_entry(&mut obj, "binaryData", entry, true)?
            }
            ("ConfigMap", Field::Varint(4, v)) | ("Secret", Field::Varint(5, v)) => {
                obj.insert("immutable".into(), Value::Bool(v != 0));
            }
            ("Secret", Field::Bytes(2, entry)) => insert_map_entry(&mut obj, "data", entry, true)?,
            ("Secret", Field::Bytes(3, v)) => {
                _ = obj.insert("type".into(), Value::String(text(v)?))
            }
            ("Secret", Field::Bytes(4, entry)) => {
                insert_map_entry(&mut obj, "stringData", entry, false)?
            }
            _ => {}
        }
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((number << 3) | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    fn entry(k: &str, v: &[u8]) -> Vec<u8> {
        [field(1, k.as_bytes()), field(2, v)].concat()
    }

    fn envelope(kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let type_meta = [field(1, b"v1"), field(2, kind.as_bytes())].concat();
        [MAGIC.to_vec(), field(1, &type_meta), field(2, &raw)].concat()
    }

    #[test]
    fn configmap_with_labels_and_data() {
        let meta = [
            field(1, b"settings"),
            field(3, b"team"),
            field(11, &entry("app", b"web")),
        ]
        .concat();
        let raw = [
            field(1, &meta),
            field(2, &entry("k", b"v")),
            field(3, &entry("bin", b"\x00\x01")),
        ]
        .concat();
        let obj = decode(&envelope("ConfigMap", raw)).expect("decodes");
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "settings", "namespace": "team", "labels": {"app": "web"}},
                   "data": {"k": "v"}, "binaryData": {"bin": "AAE="}})
        );
    }

    #[test]
    fn secret_bytes_become_base64_and_other_kinds_are_refused() {
        let raw = [
            field(1, &field(1, b"token")),
            field(2, &entry("t", b"hi")),
            field(3, b"Opaque"),
        ]
        .concat();
        let obj = decode(&envelope("Secret", raw)).expect("decodes");
        assert_eq!(obj["data"]["t"], "aGk=");
        assert_eq!(obj["type"], "Opaque");
        let err = decode(&envelope("Pod", Vec::new())).expect_err("pods are not decoded");
        assert!(err.contains("kubectl apply"), "{err}");
        assert!(decode(b"not protobuf").is_err());
        assert!(
            decode(&[MAGIC, &[0x0a, 0x05, 0x01]].concat()).is_err(),
            "truncated field"
        );
    }
}
