//! Values as DynamoDB attributes, through serde_json: objects become maps, arrays lists,
//! numbers `N`, strings `S`, booleans `BOOL`, null `NULL`; and the item size DynamoDB counts.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::{Map, Number, Value};

/// A JSON value as an attribute.
pub(crate) fn to_attribute(value: &Value) -> AttributeValue {
    match value {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Array(items) => AttributeValue::L(items.iter().map(to_attribute).collect()),
        Value::Object(fields) => AttributeValue::M(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), to_attribute(v)))
                .collect(),
        ),
    }
}

/// An attribute back as JSON; `None` for kinds JSON has no form for (sets, binary).
pub(crate) fn from_attribute(attribute: &AttributeValue) -> Option<Value> {
    Some(match attribute {
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::N(n) => Value::Number(parse_number(n)?),
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::L(items) => {
            Value::Array(items.iter().map(from_attribute).collect::<Option<_>>()?)
        }
        AttributeValue::M(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Some((k.clone(), from_attribute(v)?)))
                .collect::<Option<Map<_, _>>>()?,
        ),
        _ => return None,
    })
}

fn parse_number(n: &str) -> Option<Number> {
    if let Ok(u) = n.parse::<u64>() {
        return Some(u.into());
    }
    if let Ok(i) = n.parse::<i64>() {
        return Some(i.into());
    }
    Number::from_f64(n.parse::<f64>().ok()?)
}

/// The size DynamoDB counts against its 400 KB item limit, rounded up where its rules
/// approximate (numbers: about one byte per two digits plus one; each list or map element
/// one byte more; a map's keys count like names).
pub(crate) fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter().map(|(k, v)| k.len() + attribute_size(v)).sum()
}

fn attribute_size(attribute: &AttributeValue) -> usize {
    match attribute {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => n.len().div_ceil(2) + 1,
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::L(items) => 3 + items.iter().map(|v| 1 + attribute_size(v)).sum::<usize>(),
        AttributeValue::M(fields) => {
            3 + fields
                .iter()
                .map(|(k, v)| 1 + k.len() + attribute_size(v))
                .sum::<usize>()
        }
        AttributeValue::Ss(items) => items.iter().map(String::len).sum(),
        AttributeValue::Ns(items) => items.iter().map(|n| n.len().div_ceil(2) + 1).sum(),
        AttributeValue::Bs(items) => items.iter().map(|b| b.as_ref().len()).sum(),
        // Kinds added to the SDK later: count generously rather than under-count.
        _ => 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_attributes() {
        let value = serde_json::json!({
            "campaign": "c-1",
            "count": 42,
            "negative": -7,
            "ratio": 0.25,
            "flags": [true, null, "x"],
            "nested": {"a": {"b": []}}
        });
        let back = from_attribute(&to_attribute(&value)).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn item_size_grows_with_content_and_names() {
        let small: HashMap<String, AttributeValue> =
            [("id".to_owned(), AttributeValue::S("x".into()))].into();
        let big: HashMap<String, AttributeValue> =
            [("id".to_owned(), AttributeValue::S("x".repeat(500_000)))].into();
        assert_eq!(item_size(&small), 3);
        assert!(item_size(&big) > 400 * 1024);
    }
}
