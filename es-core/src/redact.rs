//! Secrets kept out of what is displayed: connection URLs carry passwords,
//! and a URL that reaches a log line, an error or a health answer must not.

/// `url` with the password of its user info replaced by `***`
/// (`postgres://app:***@db/orders`); a URL without a password is returned as
/// it is.
///
/// ```
/// use es_core::redact_url;
/// assert_eq!(redact_url("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
/// assert_eq!(redact_url("redis://:secret@cache:6379"), "redis://:***@cache:6379");
/// assert_eq!(redact_url("postgres://app@db/orders"), "postgres://app@db/orders");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    // The user info ends at the last '@' before the path.
    let authority_end = url[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end]
        .rfind('@')
        .map(|i| scheme_end + i)
    else {
        return url.to_owned();
    };
    match url[scheme_end..at].split_once(':') {
        Some((user, _password)) => format!("{}{user}:***{}", &url[..scheme_end], &url[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn the_password_is_replaced_and_nothing_else_changes() {
        let cases = [
            (
                "postgres://u:p@h:5432/db?sslmode=require",
                "postgres://u:***@h:5432/db?sslmode=require",
            ),
            ("amqp://guest:gu@st@h/%2f", "amqp://guest:***@h/%2f"),
            ("redis://:s3cr3t@h:6379", "redis://:***@h:6379"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?password=x@y",
                "postgres://h/db?password=x@y",
            ),
            ("not a url", "not a url"),
            ("", ""),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
