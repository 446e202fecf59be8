//! `derive`: named fields computed into each polled value (each element of a split source, each row of an
//! array) from its numeric fields, e.g. `mid = (bid + ask) / 2`. The expressions are arithmetic only, parsed
//! once at start by `exmex` (a small math-expression crate): numbers, the fields as variables, `+ - * / ^`,
//! parentheses and the usual functions (`abs`, `sqrt`, `ln`, `sin`, ...). There are no loops, assignments,
//! strings, conditionals or calls out, so an expression can only compute a number from the fields it names, and
//! one evaluation is a single pass over its parsed form: its cost is bounded by its length (at most
//! [`MAX_EXPRESSION_LEN`] characters, [`MAX_DERIVED`] fields per source).

use exmex::prelude::*;
use serde_json::{Map, Number, Value};

use crate::poller::transform::round_significant;

/// Longest expression accepted, in characters.
pub const MAX_EXPRESSION_LEN: usize = 256;
/// Most derived fields per source.
pub const MAX_DERIVED: usize = 32;

/// One derived field: its name and its parsed expression.
pub struct Derived {
    /// The field written into the value.
    name: String,
    /// The expression, parsed; its variables are field names.
    expression: FlatEx<f64>,
}

/// Parses a source's `derive` list: each entry is `name = expression`. Errors name the entry.
pub fn parse_all<S: AsRef<str>>(specs: &[S]) -> Result<Vec<Derived>, String> {
    if specs.len() > MAX_DERIVED {
        return Err(format!("at most {MAX_DERIVED} derived fields"));
    }
    specs
        .iter()
        .map(|spec| {
            let spec = spec.as_ref();
            parse_one(spec).map_err(|e| format!("`{spec}`: {e}"))
        })
        .collect()
}

fn parse_one(spec: &str) -> Result<Derived, String> {
    let (name, expression) = spec.split_once('=').ok_or("expected `name = expression`")?;
    let (name, expression) = (name.trim(), expression.trim());
    let mut chars = name.chars();
    let valid_name = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(format!(
            "`{name}` is not a field name (letters, digits and `_`, not starting with a digit)"
        ));
    }
    if expression.is_empty() {
        return Err("the expression is empty".into());
    }
    if expression.chars().count() > MAX_EXPRESSION_LEN {
        return Err(format!(
            "the expression is longer than {MAX_EXPRESSION_LEN} characters"
        ));
    }
    let expression = exmex::parse::<f64>(expression).map_err(|e| e.to_string())?;
    Ok(Derived {
        name: name.to_string(),
        expression,
    })
}

/// Adds the derived fields to `value`: an object, or each object of an array. Earlier fields can be used by
/// later ones (`spread_pct` may use `mid`). A field is `null` when a variable it uses is missing or not a
/// number (a numeric string such as `"1.5"` counts as a number) or when the result is not finite (a division
/// by zero); the value is published all the same.
pub fn apply(derived: &[Derived], value: Value) -> Result<Value, String> {
    if derived.is_empty() {
        return Ok(value);
    }
    match value {
        Value::Object(fields) => Ok(Value::Object(apply_object(derived, fields))),
        Value::Array(rows) => Ok(Value::Array(
            rows.into_iter()
                .map(|row| match row {
                    Value::Object(fields) => Value::Object(apply_object(derived, fields)),
                    other => other,
                })
                .collect(),
        )),
        _ => Err("`derive` needs an object (or an array of objects) to add fields to".into()),
    }
}

fn apply_object(derived: &[Derived], mut fields: Map<String, Value>) -> Map<String, Value> {
    let mut inputs = Vec::new();
    for field in derived {
        inputs.clear();
        let complete = field.expression.var_names().iter().all(|name| {
            let number = match fields.get(name) {
                Some(Value::Number(n)) => n.as_f64(),
                Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            number.map(|n| inputs.push(n)).is_some()
        });
        let result = complete
            .then(|| field.expression.eval(&inputs).ok())
            .flatten()
            .filter(|r| r.is_finite())
            .and_then(|r| number(round_significant(r)));
        fields.insert(field.name.clone(), result.unwrap_or(Value::Null));
    }
    fields
}

/// A JSON number, an integer when the result is a whole number that fits one.
fn number(x: f64) -> Option<Value> {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        return Some(Value::from(x as i64));
    }
    Number::from_f64(x).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn derive(specs: &[&str], value: Value) -> Value {
        apply(&parse_all(specs).unwrap(), value).unwrap()
    }

    #[test]
    fn mid_and_spread_from_bid_and_ask() {
        let out = derive(
            &[
                "mid = (bid + ask) / 2",
                "spread_pct = (ask - bid) / mid * 100",
            ],
            json!({"bid": 99.0, "ask": "101"}),
        );
        assert_eq!(
            out,
            json!({"bid": 99.0, "ask": "101", "mid": 100, "spread_pct": 2})
        );
        // Binary noise is rounded away: (0.1 + 0.2) * 1 is 0.3.
        assert_eq!(
            derive(&["s = (a + b) * 1"], json!({"a": 0.1, "b": 0.2}))["s"],
            0.3
        );
    }

    #[test]
    fn missing_inputs_and_non_finite_results_are_null() {
        let out = derive(
            &["mid = (bid + ask) / 2", "r = 1 / bid"],
            json!({"bid": 0, "ask": null}),
        );
        assert_eq!(out["mid"], Value::Null);
        assert_eq!(out["r"], Value::Null);
    }

    #[test]
    fn each_row_of_an_array() {
        let out = derive(&["x2 = x * 2"], json!([{"x": 1}, {"x": 2}, 3]));
        assert_eq!(out, json!([{"x": 1, "x2": 2}, {"x": 2, "x2": 4}, 3]));
        assert!(apply(&parse_all(&["a = 1"]).unwrap(), json!(3)).is_err());
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry() {
        for bad in [
            "mid",
            "= 1",
            "1x = 2",
            "m = ",
            "m = (bid + ",
            "m = bid +* ask",
        ] {
            let e = parse_all(&[bad])
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains(bad.trim()), "{e}");
        }
        let long = format!("m = {}", "1+".repeat(200) + "1");
        assert!(parse_all(&[long]).err().unwrap().contains("longer than"));
        let many: Vec<String> = (0..=MAX_DERIVED).map(|i| format!("f{i} = 1")).collect();
        assert!(parse_all(&many).is_err());
    }
}
