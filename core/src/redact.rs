//! Error messages without the values they quote: logs and dead letters name kinds, positions
//! and sizes, never payload values or secrets.

/// `message` without the value it quotes: everything from the first quote (`"`, `` ` `` or
/// `'`) to the last `, expected ` after it becomes `…`; the kind before it, what was expected,
/// and serde_json's ` at line L column C` stay. `missing field` and `duplicate field` messages
/// stay whole: the field name comes from the target type.
///
/// serde's messages quote what they refuse: `invalid type: string "4111…", expected u64`,
/// ``invalid type: integer `4111`, expected a string``, ``unknown variant `secret`, expected
/// one of `A`, `B` ``. A value may itself hold quotes, escaped or not, so nothing between the
/// first quote and what the type says it expected is kept. A decoder's message is about a
/// payload, and a configuration's may be about a secret.
pub fn without_values(message: &str) -> String {
    let (body, place) = match message.rfind(" at line ") {
        Some(i) if is_place(&message[i..]) => message.split_at(i),
        _ => (message, ""),
    };
    let names_a_field = ["missing field `", "duplicate field `"]
        .iter()
        .any(|p| body.strip_prefix(p).is_some_and(is_field_name));
    let Some(quote) = body.find(['"', '`', '\'']).filter(|_| !names_a_field) else {
        return message.to_owned();
    };
    let expected = body[quote..]
        .rfind(", expected ")
        .map(|i| &body[quote + i..])
        .filter(|e| names_only(&e[", expected ".len()..]))
        .unwrap_or("");
    format!("{} …{expected}{place}", body[..quote].trim_end())
}

/// Whether what serde says it expected is the type's own words: no quotes, or `one of` a list
/// of backticked identifiers (the type's variants or fields). Anything else may be part of the
/// value.
fn names_only(expected: &str) -> bool {
    if !expected.contains(['"', '`', '\'']) {
        return true;
    }
    // serde writes `A`, `A` or `B`, and one of `A`, `B`, `C`.
    let list = expected.strip_prefix("one of ").unwrap_or(expected);
    list.split(", ")
        .flat_map(|item| item.split(" or "))
        .all(|item| item.strip_prefix('`').is_some_and(is_field_name))
}

/// Whether `text` is serde_json's ` at line L column C`.
fn is_place(text: &str) -> bool {
    let mut words = text.split_whitespace();
    matches!(
        (words.next(), words.next(), words.next(), words.next(), words.next(), words.next()),
        (Some("at"), Some("line"), Some(l), Some("column"), Some(c), None)
            if l.bytes().all(|b| b.is_ascii_digit()) && c.bytes().all(|b| b.is_ascii_digit())
    )
}

/// Whether `rest` is an identifier closed by a backtick and nothing else.
fn is_field_name(rest: &str) -> bool {
    rest.strip_suffix('`').is_some_and(|name| {
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// An output identity path (`OutputId::to_path`), or an object key or file path that ends in
/// one, as errors and logs show it: a record output's path (its position) whole, a keyed
/// result's with its key replaced by the key's length, so that no key (a user id, an address)
/// is quoted: `w/<start>-<end>/<key: 12 bytes>/1`. The key is the component after the first
/// `w/<start>-<end>`, or else after the first `k`.
pub fn output_path(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').collect();
    let is_window = |p: &str| {
        p.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
        })
    };
    let window_key = (0..parts.len())
        .find(|&i| parts[i] == "w" && i + 2 < parts.len() && is_window(parts[i + 1]))
        .map(|i| i + 2);
    let key_at = window_key.or_else(|| {
        (0..parts.len())
            .find(|&i| parts[i] == "k" && i + 1 < parts.len())
            .map(|i| i + 1)
    });
    let Some(key_at) = key_at else {
        return path.to_owned();
    };
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            if i == key_at {
                format!("<key: {} bytes>", part.len())
            } else {
                (*part).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// `endpoint` (a URL) without any `user:password@` before its host: endpoints are logged and
/// shown in `Debug` output.
pub fn without_user_info(endpoint: &str) -> String {
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), endpoint),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}<redacted>@{host}{path}"),
        None => endpoint.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_go_and_field_names_of_the_target_type_stay() {
        let err = serde_json::from_str::<u64>("\"4111-1111\"").unwrap_err();
        let shown = without_values(&err.to_string());
        assert_eq!(
            shown,
            "invalid type: string …, expected u64 at line 1 column 11"
        );

        let err = serde_json::from_str::<String>("41111111").unwrap_err();
        let shown = without_values(&err.to_string());
        assert!(
            !shown.contains("4111") && shown.contains("expected a string"),
            "{shown}"
        );

        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        enum Kind {
            Alpha,
        }
        let err = serde_json::from_str::<Kind>("\"hunter2\"").unwrap_err();
        let shown = without_values(&err.to_string());
        assert!(
            !shown.contains("hunter2") && shown.contains("`Alpha`"),
            "{shown}"
        );

        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        #[serde(deny_unknown_fields)]
        struct Click {
            ts: i64,
        }
        let err = serde_json::from_str::<Click>("{}").unwrap_err();
        assert!(without_values(&err.to_string()).contains("missing field `ts`"));
        let err = serde_json::from_str::<Click>(r#"{"ts":1,"ts":2}"#).unwrap_err();
        assert!(without_values(&err.to_string()).contains("duplicate field `ts`"));
        let err = serde_json::from_str::<Click>(r#"{"secret-name":1}"#).unwrap_err();
        assert!(!without_values(&err.to_string()).contains("secret"));
    }

    #[test]
    fn values_holding_quotes_or_backticks_do_not_escape() {
        // An escaped quote inside the value, and backticks inside a variant name.
        let err = serde_json::from_str::<u64>(r#""ab\"SECRET-4111 and more""#).unwrap_err();
        let shown = without_values(&err.to_string());
        assert!(!shown.contains("SECRET"), "{shown}");
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        enum Kind {
            Alpha,
        }
        let err = serde_json::from_str::<Kind>(r#""x`SECRET-hunter2`y, expected z""#).unwrap_err();
        let shown = without_values(&err.to_string());
        assert!(!shown.contains("SECRET"), "{shown}");
        let err = serde_json::from_str::<Kind>(r#""x`, expected `SECRET`, there""#).unwrap_err();
        let shown = without_values(&err.to_string());
        assert!(!shown.contains("SECRET"), "{shown}");
        assert_eq!(
            without_values("unknown field `a, expected x`, there are no fields"),
            "unknown field …"
        );
        assert_eq!(without_values("value \"open"), "value …");
        assert_eq!(without_values("no quotes at line 1"), "no quotes at line 1");
    }

    #[test]
    fn output_paths_show_positions_and_windows_but_not_keys() {
        assert_eq!(output_path("r/42-3-1"), "r/42-3-1");
        assert_eq!(
            output_path("w/00000000000000000000-00000000000000060000/alice%40x/1"),
            "w/00000000000000000000-00000000000000060000/<key: 9 bytes>/1"
        );
        assert_eq!(output_path("k/alice"), "k/<key: 5 bytes>");
        // Object keys and file paths that end in an identity.
        assert_eq!(
            output_path(
                "out/clicks/shardId-1/w/00000000000000000000-00000000000000060000/bob.json"
            ),
            "out/clicks/shardId-1/w/00000000000000000000-00000000000000060000/<key: 8 bytes>"
        );
        assert_eq!(output_path("t/s/k/k"), "t/s/k/<key: 1 bytes>");
        assert_eq!(output_path("s/k/alice/2"), "s/k/<key: 5 bytes>/2");
    }

    #[test]
    fn user_info_goes_from_endpoints() {
        assert_eq!(
            without_user_info("http://admin:hunter2@10.0.0.1:4566/p?x=1"),
            "http://<redacted>@10.0.0.1:4566/p?x=1"
        );
        assert_eq!(
            without_user_info("http://127.0.0.1:1"),
            "http://127.0.0.1:1"
        );
        assert_eq!(without_user_info("u@host"), "<redacted>@host");
        assert_eq!(without_user_info("http://h/a@b"), "http://h/a@b");
    }
}
