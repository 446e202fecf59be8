//! Transforms the poller applies to each upstream JSON value before caching and publishing it: JSON Pointer
//! selection and `diff` (change fields against the previous output). Parsed from the source's config strings.
//!
//! # Transforms
//!
//! A source lists transforms as strings, applied in order:
//!
//! - `"/data"`, `"/result/0/rows"`: a JSON Pointer (RFC 6901). The value is replaced by the part it selects.
//!   A pointer that selects nothing is an error, and the poll counts as a failed fetch.
//! - `"diff"`: adds change fields by comparing with the previous output; arrays are matched by index.
//! - `"diff:strike"`: the same, but array elements that are objects are matched by their `strike` field.
//!
//! # How `diff` works
//!
//! For every numeric field `x` of every object (at any depth, through nested objects and arrays), `diff` adds
//! a sibling field `x_change` = current `x` - previous `x`, when the previous output has a number at the same
//! place. There is no `x_change` on the first value, for a row or field that is new, or when the previous
//! value at that place is not a number.
//!
//! - *Numbers*: when both values are integers, the change is an integer (`"oi": 1200` after `1000` gives
//!   `"oi_change": 200`). Otherwise it is a float rounded to 10 significant digits, so `0.3` after `0.1`
//!   gives `0.2`, never `0.19999999999999998`.
//! - *Previous output*: the comparison is with what `diff` produced last time. Only fields present in the
//!   current value are compared, so the previous `_change` fields are ignored, and fields that disappeared
//!   simply are not reported.
//! - *Arrays*: elements are matched by position; with a key (`diff:strike`), an object element is matched
//!   to the previous element whose `strike` equals its own (`100` and `100.0` are equal). A row with a key
//!   value that was not there before gets no change fields; a row that disappeared is not reported. An
//!   element without the key field is matched by position, and only to a previous element that also lacks
//!   it. When a key value appears twice in the previous array, the first such row is used. The key field of
//!   a matched row is not diffed (its change would always be zero).
//! - *Left alone*: a bare number (at the root or inside an array of numbers) has no place for a sibling and
//!   is unchanged. A field whose name already ends in `_change` is never diffed, and when the upstream
//!   already sends `x_change`, its value is kept rather than replaced.
//!
//! Because `diff` compares with the previous output of the whole list, it belongs at the end: put pointers
//! first (`["/data", "diff:strike"]`). [`parse_all`] enforces that.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Number, Value};

/// Suffix of the fields that `diff` adds.
const CHANGE_SUFFIX: &str = "_change";

/// One step of a source's transform list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    /// Replace the value with the part selected by this JSON Pointer (RFC 6901), e.g. `/data`.
    Pointer(String),
    /// Add `x_change` fields against the previous output; arrays of objects are matched by index, or by the
    /// value of the `key` field when one is given (`diff:strike`).
    Diff {
        /// Field that identifies a row in arrays of objects; `None` matches rows by position.
        key: Option<String>,
    },
}

impl Transform {
    /// Parses one config string: `/...` (a JSON Pointer), `diff`, or `diff:FIELD`. Errors name the string.
    pub fn parse(s: &str) -> Result<Transform, String> {
        if s.starts_with('/') {
            return Ok(Transform::Pointer(s.to_owned()));
        }
        if s == "diff" {
            return Ok(Transform::Diff { key: None });
        }
        if let Some(key) = s.strip_prefix("diff:") {
            if key.is_empty() {
                return Err(format!(
                    "invalid transform `{s}`: `diff:` needs a field name, e.g. `diff:strike`"
                ));
            }
            return Ok(Transform::Diff {
                key: Some(key.to_owned()),
            });
        }
        Err(format!(
            "invalid transform `{s}`: expected a JSON Pointer starting with `/`, `diff` or `diff:FIELD`"
        ))
    }

    /// Applies this one transform; `previous` is the previous output of the whole list (used by `Diff`).
    pub fn apply(&self, value: Value, previous: Option<&Value>) -> Result<Value, String> {
        match self {
            Transform::Pointer(pointer) => {
                let mut value = value;
                value
                    .pointer_mut(pointer)
                    .map(Value::take)
                    .ok_or_else(|| format!("JSON Pointer `{pointer}` selected nothing"))
            }
            Transform::Diff { key } => Ok(diff(value, previous, key.as_deref())),
        }
    }
}

impl fmt::Display for Transform {
    /// Writes the config string that parses back to this transform.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transform::Pointer(pointer) => f.write_str(pointer),
            Transform::Diff { key: None } => f.write_str("diff"),
            Transform::Diff { key: Some(key) } => write!(f, "diff:{key}"),
        }
    }
}

impl std::str::FromStr for Transform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Transform::parse(s)
    }
}

/// Parses a source's whole transform list, and rejects a `diff` that is not last (it compares with the
/// previous output of the whole list, so anything after it would change what it compares with).
pub fn parse_all<S: AsRef<str>>(specs: &[S]) -> Result<Vec<Transform>, String> {
    let transforms = specs
        .iter()
        .map(|s| Transform::parse(s.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(pos) = transforms
        .iter()
        .position(|t| matches!(t, Transform::Diff { .. }))
        && pos + 1 != transforms.len()
    {
        return Err(format!(
            "transform `{}` must be the last one (it compares with the previous output)",
            transforms[pos]
        ));
    }
    Ok(transforms)
}

/// Applies `transforms` in order. `previous` is the previous output of this same list for this source, or
/// `None` for the first value. An error (a pointer that selects nothing) means the poll failed.
pub fn apply_all(
    transforms: &[Transform],
    value: Value,
    previous: Option<&Value>,
) -> Result<Value, String> {
    transforms
        .iter()
        .try_fold(value, |value, t| t.apply(value, previous))
}

/// The `diff` transform: `current` with `x_change` fields added (see the module documentation).
fn diff(current: Value, previous: Option<&Value>, key: Option<&str>) -> Value {
    match current {
        Value::Object(fields) => Value::Object(diff_object(fields, previous, key, None)),
        Value::Array(items) => Value::Array(diff_array(items, previous, key)),
        other => other,
    }
}

/// Diffs the fields of one object against the previous value at the same place; `row_key` is the key field
/// of an array row, which is left as is.
fn diff_object(
    fields: Map<String, Value>,
    previous: Option<&Value>,
    key: Option<&str>,
    row_key: Option<&str>,
) -> Map<String, Value> {
    let previous = previous.and_then(Value::as_object);
    // Upstream `x_change` fields win over computed ones.
    let upstream_changes: Vec<String> = fields
        .keys()
        .filter(|name| name.ends_with(CHANGE_SUFFIX))
        .cloned()
        .collect();
    let mut out = Map::new();
    for (name, value) in fields {
        if name.ends_with(CHANGE_SUFFIX) || Some(name.as_str()) == row_key {
            out.insert(name, value);
            continue;
        }
        let before = previous.and_then(|p| p.get(&name));
        match value {
            Value::Number(now) => {
                let change_name = format!("{name}{CHANGE_SUFFIX}");
                let change = match before {
                    Some(Value::Number(then)) if !upstream_changes.contains(&change_name) => {
                        subtract(&now, then)
                    }
                    _ => None,
                };
                out.insert(name, Value::Number(now));
                if let Some(change) = change {
                    out.insert(change_name, Value::Number(change));
                }
            }
            nested @ (Value::Object(_) | Value::Array(_)) => {
                out.insert(name, diff(nested, before, key));
            }
            other => {
                out.insert(name, other);
            }
        }
    }
    out
}

/// Diffs the elements of an array, matching each to a previous element by key or by position.
fn diff_array(items: Vec<Value>, previous: Option<&Value>, key: Option<&str>) -> Vec<Value> {
    let previous = previous.and_then(Value::as_array);
    let by_key: HashMap<String, &Value> = match (key, previous) {
        (Some(key), Some(prev)) => {
            let mut index = HashMap::new();
            for row in prev {
                if let Some(id) = row.get(key).map(key_identity) {
                    index.entry(id).or_insert(row);
                }
            }
            index
        }
        _ => HashMap::new(),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at_index = previous.and_then(|p| p.get(i));
            let before = match key {
                None => at_index,
                Some(key) => match item.get(key) {
                    Some(id) => by_key.get(&key_identity(id)).copied(),
                    // Keyless rows pair only with keyless rows.
                    None => at_index.filter(|p| p.get(key).is_none()),
                },
            };
            match item {
                Value::Object(fields) => Value::Object(diff_object(fields, before, key, key)),
                Value::Array(_) => diff(item, before, key),
                // Bare numbers (and other scalars) inside arrays are left unchanged.
                scalar => scalar,
            }
        })
        .collect()
}

/// A hashable identity for a key field's value; numbers compare by value, so `100` and `100.0` are one row.
fn key_identity(value: &Value) -> String {
    match value {
        Value::Number(n) => match n.as_f64() {
            // `+ 0.0` turns -0.0 into 0.0.
            Some(f) => format!("n:{}", f + 0.0),
            None => format!("n:{n}"),
        },
        Value::String(s) => format!("s:{s}"),
        other => format!("j:{other}"),
    }
}

/// `now - then`: an integer when both are integers (and the result fits), else a float rounded to 10
/// significant digits. `None` when the result is not a finite number.
fn subtract(now: &Number, then: &Number) -> Option<Number> {
    if let (Some(a), Some(b)) = (as_i128(now), as_i128(then)) {
        let d = a - b;
        if let Ok(d) = i64::try_from(d) {
            return Some(Number::from(d));
        }
        if let Ok(d) = u64::try_from(d) {
            return Some(Number::from(d));
        }
    }
    let d = round_significant(now.as_f64()? - then.as_f64()?);
    Number::from_f64(d)
}

/// The integer value of a JSON number that is written as an integer.
fn as_i128(n: &Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

/// Rounds to 10 significant digits (removes binary noise such as `0.30000000000000004`).
pub(crate) fn round_significant(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        // Also turns -0.0 into 0.0.
        return if x == 0.0 { 0.0 } else { x };
    }
    // Scientific notation with 9 decimals is 10 significant digits; parsing it back always succeeds.
    format!("{x:.9e}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn diff_key(key: &str) -> Vec<Transform> {
        vec![Transform::Diff {
            key: Some(key.to_owned()),
        }]
    }

    #[test]
    fn parses_config_strings() {
        assert_eq!(
            Transform::parse("/data").unwrap(),
            Transform::Pointer("/data".into())
        );
        assert_eq!(
            Transform::parse("/").unwrap(),
            Transform::Pointer("/".into())
        );
        assert_eq!(
            Transform::parse("diff").unwrap(),
            Transform::Diff { key: None }
        );
        assert_eq!(
            Transform::parse("diff:strike").unwrap(),
            Transform::Diff {
                key: Some("strike".into())
            }
        );
        for bad in ["", "data", "diff:", "Diff", "diffs", " /data"] {
            let err = Transform::parse(bad).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
        for s in ["/a/b", "diff", "diff:strike"] {
            assert_eq!(Transform::parse(s).unwrap().to_string(), s);
            assert_eq!(s.parse::<Transform>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn parse_all_wants_diff_last() {
        assert_eq!(
            parse_all(&["/data", "diff:strike"]).unwrap(),
            vec![
                Transform::Pointer("/data".into()),
                Transform::Diff {
                    key: Some("strike".into())
                }
            ]
        );
        assert!(parse_all::<&str>(&[]).unwrap().is_empty());
        let err = parse_all(&["diff", "/data"]).unwrap_err();
        assert!(err.contains("`diff` must be the last"), "{err}");
        let err = parse_all(&["/data", "nope"]).unwrap_err();
        assert!(err.contains("`nope`"), "{err}");
    }

    #[test]
    fn pointer_selects_and_errors_on_nothing() {
        let value = json!({"data": [{"a": 1}, {"a": 2}], "a~b": {"c/d": 5}});
        let t = |p: &str| vec![Transform::Pointer(p.into())];
        assert_eq!(
            apply_all(&t("/data/1"), value.clone(), None).unwrap(),
            json!({"a": 2})
        );
        // RFC 6901 escapes: ~0 is '~', ~1 is '/'.
        assert_eq!(
            apply_all(&t("/a~0b/c~1d"), value.clone(), None).unwrap(),
            json!(5)
        );
        let err = apply_all(&t("/missing"), value.clone(), None).unwrap_err();
        assert_eq!(err, "JSON Pointer `/missing` selected nothing");
        assert!(apply_all(&t("/data/9"), value, None).is_err());
        // No transforms: unchanged.
        assert_eq!(apply_all(&[], json!([1]), None).unwrap(), json!([1]));
    }

    #[test]
    fn first_snapshot_has_no_changes() {
        let value = json!({"price": 10.5, "rows": [{"v": 1}]});
        let out = apply_all(&[Transform::Diff { key: None }], value.clone(), None).unwrap();
        assert_eq!(out, value);
    }

    #[test]
    fn option_chain_by_strike() {
        let transforms = parse_all(&["/data", "diff:strike"]).unwrap();
        let first = json!({"symbol": "NIFTY", "data": [
            {"strike": 24000, "ltp": 120.5, "oi": 1000, "iv": 0.18},
            {"strike": 24100, "ltp": 80.25, "oi": 1500, "iv": 0.17},
            {"strike": 24200, "ltp": 50.0, "oi": 700, "iv": 0.16},
        ]});
        let out1 = apply_all(&transforms, first, None).unwrap();
        assert_eq!(
            out1[0],
            json!({"strike": 24000, "ltp": 120.5, "oi": 1000, "iv": 0.18})
        );

        // 24000 dropped, 24300 appeared, rows reordered.
        let second = json!({"symbol": "NIFTY", "data": [
            {"strike": 24300, "ltp": 30.0, "oi": 200, "iv": 0.15},
            {"strike": 24200, "ltp": 47.5, "oi": 650, "iv": 0.16},
            {"strike": 24100, "ltp": 82.75, "oi": 1700, "iv": 0.175},
        ]});
        let out2 = apply_all(&transforms, second, Some(&out1)).unwrap();
        assert_eq!(
            out2,
            json!([
                {"strike": 24300, "ltp": 30.0, "oi": 200, "iv": 0.15},
                {"strike": 24200, "ltp": 47.5, "ltp_change": -2.5,
                 "oi": 650, "oi_change": -50, "iv": 0.16, "iv_change": 0.0},
                {"strike": 24100, "ltp": 82.75, "ltp_change": 2.5,
                 "oi": 1700, "oi_change": 200, "iv": 0.175, "iv_change": 0.005},
            ])
        );

        // The previous output carries `_change` fields; they are not compared.
        let third = json!({"data": [
            {"strike": 24200, "ltp": 47.5, "oi": 650, "iv": 0.16},
            {"strike": 24300, "ltp": 31.0, "oi": 200, "iv": 0.15},
        ]});
        let out3 = apply_all(&transforms, third, Some(&out2)).unwrap();
        assert_eq!(
            out3,
            json!([
                {"strike": 24200, "ltp": 47.5, "ltp_change": 0.0,
                 "oi": 650, "oi_change": 0, "iv": 0.16, "iv_change": 0.0},
                {"strike": 24300, "ltp": 31.0, "ltp_change": 1.0,
                 "oi": 200, "oi_change": 0, "iv": 0.15, "iv_change": 0.0},
            ])
        );
    }

    #[test]
    fn arrays_by_index_without_key() {
        let diff = [Transform::Diff { key: None }];
        let prev = json!([{"p": 1}, {"p": 2}]);
        let now = json!([{"p": 5}, {"p": 2}, {"p": 9}]);
        assert_eq!(
            apply_all(&diff, now, Some(&prev)).unwrap(),
            json!([{"p": 5, "p_change": 4}, {"p": 2, "p_change": 0}, {"p": 9}])
        );
    }

    #[test]
    fn nested_objects_and_arrays() {
        let diff = diff_key("id");
        let prev = json!({
            "meta": {"count": 2, "stats": {"avg": 1.5}},
            "groups": [{"id": "a", "rows": [{"id": 1, "v": 10}, {"id": 2, "v": 20}]}],
            "matrix": [[{"x": 1}]],
        });
        let now = json!({
            "meta": {"count": 3, "stats": {"avg": 1.75}, "new": {"z": 1}},
            "groups": [{"id": "a", "rows": [{"id": 2, "v": 25}, {"id": 1, "v": 10}]},
                       {"id": "b", "rows": [{"id": 1, "v": 7}]}],
            "matrix": [[{"x": 4}]],
        });
        assert_eq!(
            apply_all(&diff, now, Some(&prev)).unwrap(),
            json!({
                "meta": {"count": 3, "count_change": 1,
                         "stats": {"avg": 1.75, "avg_change": 0.25}, "new": {"z": 1}},
                "groups": [
                    {"id": "a", "rows": [{"id": 2, "v": 25, "v_change": 5},
                                         {"id": 1, "v": 10, "v_change": 0}]},
                    {"id": "b", "rows": [{"id": 1, "v": 7}]},
                ],
                "matrix": [[{"x": 4, "x_change": 3}]],
            })
        );
    }

    #[test]
    fn integers_floats_and_rounding() {
        let diff = [Transform::Diff { key: None }];
        let prev = json!({"i": 10, "f": 0.1, "mix": 1, "mix2": 2.5, "big": u64::MAX, "neg": -5});
        let now = json!({"i": 7, "f": 0.4, "mix": 1.5, "mix2": 3, "big": 1, "neg": i64::MAX});
        let out = apply_all(&diff, now, Some(&prev)).unwrap();
        assert_eq!(out["i_change"], json!(-3));
        assert!(out["i_change"].is_i64());
        // 0.4 - 0.1 is 0.30000000000000004 in f64.
        assert_eq!(out["f_change"], json!(0.3));
        assert_eq!(out["f_change"].to_string(), "0.3");
        assert_eq!(out["mix_change"], json!(0.5));
        assert_eq!(out["mix2_change"], json!(0.5));
        assert!(out["mix2_change"].is_f64());
        // Integer results beyond i64 and u64 range become floats (rounded like any float).
        assert_eq!(out["big_change"], json!(-1.844674407e19));
        assert_eq!(out["neg_change"], json!(i64::MAX as u64 + 5));
        assert!(out["neg_change"].is_u64());
        // An unchanged float gives 0.0, never -0.0.
        let out = apply_all(&diff, json!({"f": -0.5}), Some(&json!({"f": -0.5}))).unwrap();
        assert_eq!(out["f_change"].to_string(), "0.0");
        assert_eq!(round_significant(1234.567890123456), 1234.56789);
        assert_eq!(round_significant(-1e-20 / 3.0), -3.333333333e-21);
    }

    #[test]
    fn left_alone_cases() {
        let diff = [Transform::Diff { key: None }];
        // Bare numbers at the root and in arrays of numbers.
        assert_eq!(
            apply_all(&diff, json!(5), Some(&json!(3))).unwrap(),
            json!(5)
        );
        assert_eq!(
            apply_all(&diff, json!({"xs": [1, 2]}), Some(&json!({"xs": [0, 0]}))).unwrap(),
            json!({"xs": [1, 2]})
        );
        // Upstream `_change` fields are not diffed, and an upstream `x_change` is kept as sent.
        let prev = json!({"x": 1, "x_change": 9, "y_change": 3});
        let now = json!({"x": 5, "x_change": -1, "y_change": 4});
        assert_eq!(
            apply_all(&diff, now, Some(&prev)).unwrap(),
            json!({"x": 5, "x_change": -1, "y_change": 4})
        );
        // Type changes and non-numbers: nothing added.
        let prev = json!({"a": "1", "b": 2, "c": {"d": 1}, "e": true});
        let now = json!({"a": 1, "b": "2", "c": 3, "e": false});
        assert_eq!(apply_all(&diff, now.clone(), Some(&prev)).unwrap(), now);
        // Previous of another shape entirely.
        assert_eq!(
            apply_all(&diff, json!({"a": 1}), Some(&json!([1]))).unwrap(),
            json!({"a": 1})
        );
    }

    #[test]
    fn key_matching_details() {
        let diff = diff_key("k");
        // 100 and 100.0 are the same key; the first duplicate wins; keyless rows pair by index with
        // keyless rows.
        let prev = json!([{"k": 100, "v": 1}, {"k": 100, "v": 50}, {"v": 7}, {"k": "s", "v": 2}]);
        let now = json!([{"k": 100.0, "v": 2}, {"k": 3, "v": 1}, {"v": 8}, {"v": 9}]);
        assert_eq!(
            apply_all(&diff, now, Some(&prev)).unwrap(),
            json!([
                {"k": 100.0, "v": 2, "v_change": 1},
                {"k": 3, "v": 1},
                {"v": 8, "v_change": 1},
                {"v": 9},
            ])
        );
    }
}
