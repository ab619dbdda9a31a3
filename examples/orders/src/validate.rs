//! Checks on client text at the edge, before anything is written: what a
//! request may carry into events, logs, emails and the read models.

use crate::{Error, Result};

/// Whether `c` changes how surrounding text is displayed without being seen:
/// bidirectional embeddings, overrides and isolates, zero-width characters
/// and the byte-order mark.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// `raw` trimmed, if it has at most `max_chars` characters, no control
/// character (NUL, CR, LF, ESC, DEL, ...) and no invisible formatting
/// character; else a validation error naming `field`.
///
/// # Errors
/// [`Error::Validation`] naming `field` and what is wrong.
pub(crate) fn text(field: &str, raw: &str, max_chars: usize) -> Result<String> {
    let value = raw.trim();
    if value.chars().count() > max_chars {
        return Err(Error::validation(
            field,
            format!("at most {max_chars} characters"),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Error::validation(
            field,
            format!("control character U+{:04X} is not allowed", u32::from(c)),
        ));
    }
    if let Some(c) = value.chars().find(|c| is_invisible_format(*c)) {
        return Err(Error::validation(
            field,
            format!(
                "invisible formatting character U+{:04X} is not allowed",
                u32::from(c)
            ),
        ));
    }
    Ok(value.to_owned())
}

/// [`text`] that must not be empty.
///
/// # Errors
/// [`Error::Validation`] naming `field`.
pub(crate) fn required_text(field: &str, raw: &str, max_chars: usize) -> Result<String> {
    let value = text(field, raw, max_chars)?;
    if value.is_empty() {
        return Err(Error::validation(
            field,
            format!("1 to {max_chars} characters are required"),
        ));
    }
    Ok(value)
}

/// An email address's shape, normalised (trimmed, lower case): what an SMTP
/// server accepts as a mailbox, in its common dot-atom form: a local part of
/// letters, digits and `!#$%&'*+/=?^_`{|}~-` separated by single dots, and a
/// domain of at least two labels of letters, digits and inner hyphens.
///
/// # Errors
/// [`Error::Validation`] naming `field`.
pub(crate) fn email(field: &str, raw: &str) -> Result<String> {
    let email = raw.trim().to_lowercase();
    let invalid = |why: &str| {
        Err(Error::validation(
            field,
            format!("{raw:?} is not a valid email address: {why}"),
        ))
    };
    if email.is_empty() || email.len() > 254 {
        return invalid("it must be 1 to 254 characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return invalid("it has no @");
    };
    if local.is_empty() || local.len() > 64 || domain.contains('@') {
        return invalid("it needs exactly one @ with a name of 1 to 64 characters before it");
    }
    let atom = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~-".contains(c);
    if local
        .split('.')
        .any(|part| part.is_empty() || !part.chars().all(atom))
    {
        return invalid("the name before @ has a character or a dot out of place");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return invalid("the domain needs two or more labels of letters, digits and hyphens");
    }
    Ok(email)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(result: Result<String>) -> String {
        match result {
            Err(Error::Validation { field, message }) => format!("{field}: {message}"),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn text_refuses_control_and_invisible_characters_naming_the_field() {
        assert_eq!(text("reason", "  too late \t", 20).unwrap(), "too late");
        for bad in [
            "nul\u{0}here",
            "two\r\nlines",
            "esc\u{1b}[31mred",
            "del\u{7f}",
            "\u{202E}evil",
            "zero\u{200B}width",
            "bom\u{FEFF}",
            "isolate\u{2066}x",
        ] {
            let why = refused(text("reason", bad, 100));
            assert!(why.starts_with("reason: "), "{why}");
        }
        assert!(refused(text("name", &"x".repeat(21), 20)).contains("at most 20"));
        assert!(refused(required_text("name", "   ", 20)).contains("1 to 20"));
        // Letters of any script are fine.
        assert_eq!(
            text("name", "Çay bardağı 茶", 20).unwrap(),
            "Çay bardağı 茶"
        );
    }

    #[test]
    fn email_takes_common_addresses_and_refuses_what_smtp_would() {
        for good in ["ada@example.com", " Ada.Lovelace+orders@Mail.Example.ORG "] {
            assert!(email("customer_email", good).is_ok(), "{good}");
        }
        for bad in [
            ".a@b.co",
            "a.@b.co",
            "a..b@c.co",
            "a@b",
            "a@-b.co",
            "a@b-.co",
            "a@b..co",
            "a b@c.co",
            "a\"b@c.co",
            "a@b@c.co",
            "a@bü.co",
            "@b.co",
        ] {
            let why = refused(email("customer_email", bad));
            assert!(why.starts_with("customer_email: "), "{bad}: {why}");
        }
        assert!(email("customer_email", &format!("{}@b.co", "a".repeat(65))).is_err());
    }
}
