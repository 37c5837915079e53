//! Identifier case conversion for event names and method names.

/// `UserCreated` → `user_created`; `HTTPRequestSent` → `http_request_sent`.
pub(crate) fn snake_case(ident: &str) -> String {
    let chars: Vec<char> = ident.trim_start_matches("r#").chars().collect();
    let mut out = String::with_capacity(chars.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let previous = i.checked_sub(1).map(|p| chars[p]);
            let next = chars.get(i + 1).copied();
            let starts_word = match previous {
                None | Some('_') => false,
                Some(p) if p.is_lowercase() || p.is_ascii_digit() => true,
                // The last capital of an acronym starts the next word: `HTTPRequest`.
                Some(p) if p.is_uppercase() => next.is_some_and(char::is_lowercase),
                Some(_) => false,
            };
            if starts_word {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `UserCreated` → `user.created`: the default event name.
pub(crate) fn dotted(ident: &str) -> String {
    snake_case(ident).replace('_', ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_camel_case_with_acronyms_and_digits() {
        for (ident, snake) in [
            ("UserCreated", "user_created"),
            ("PostPublished", "post_published"),
            ("HTTPRequestSent", "http_request_sent"),
            ("Oauth2Linked", "oauth2_linked"),
            ("V2Migrated", "v2_migrated"),
            ("Ping", "ping"),
            ("IOError", "io_error"),
        ] {
            assert_eq!(snake_case(ident), snake, "{ident}");
        }
        assert_eq!(dotted("UserCreated"), "user.created");
    }
}
