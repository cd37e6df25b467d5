//! Error messages without the values they quote: logs and dead letters name kinds, positions
//! and sizes, never payload values or secrets.

/// `message` with every quoted part (`"…"` and `` `…` ``) replaced by `…`, except the field
/// names after `missing field` and `duplicate field`, which come from the target type.
///
/// serde's messages quote what they refuse: `invalid type: string "4111…", expected u64`,
/// ``invalid type: integer `4111`, expected a string``, ``unknown variant `secret` ``. A
/// decoder's message is about a payload, and a configuration's may be about a secret.
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`']) {
        let (before, from) = rest.split_at(open);
        out.push_str(before);
        let quote = from.as_bytes()[0] as char;
        let Some(len) = from[1..].find(quote) else {
            // An unclosed quote: what follows may be a value.
            out.push(quote);
            out.push('…');
            return out;
        };
        let quoted = &from[..len + 2];
        let names_a_field =
            quote == '`' && (out.ends_with("missing field ") || out.ends_with("duplicate field "));
        if names_a_field {
            out.push_str(quoted);
        } else {
            out.push(quote);
            out.push('…');
            out.push(quote);
        }
        rest = &from[len + 2..];
    }
    out.push_str(rest);
    out
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
        assert!(!shown.contains("4111"), "{shown}");
        assert!(
            shown.starts_with("invalid type: string \"…\", expected u64"),
            "{shown}"
        );

        let err = serde_json::from_str::<String>("41111111").unwrap_err();
        assert!(!without_values(&err.to_string()).contains("4111"));

        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        enum Kind {
            A,
        }
        let err = serde_json::from_str::<Kind>("\"hunter2\"").unwrap_err();
        assert!(!without_values(&err.to_string()).contains("hunter2"));

        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Click {
            ts: i64,
        }
        let err = serde_json::from_str::<Click>("{}").unwrap_err();
        assert!(without_values(&err.to_string()).contains("missing field `ts`"));
        let err = serde_json::from_str::<Click>(r#"{"ts":1,"ts":2}"#).unwrap_err();
        assert!(without_values(&err.to_string()).contains("duplicate field `ts`"));

        assert_eq!(without_values("value \"open"), "value \"…");
        assert_eq!(without_values("no quotes at line 1"), "no quotes at line 1");
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
