//! What an identifier may look like: a tenant, a user, a module, a job, a lease id, an
//! audience. One rule for every place an id is accepted in a request or read from a token,
//! so `diku` and `diku\u{200B}` can never be two tenants and a job id can't hide a
//! right-to-left override in an operator's terminal.

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Why an identifier is refused; `Display` is the problem for a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdProblem {
    /// Empty, or nothing but white space.
    #[error("is blank")]
    Blank,
    /// Longer than the limit, in bytes.
    #[error("is longer than {0} bytes")]
    TooLong(usize),
    /// Holds a control character (C0, C1, DEL).
    #[error("contains control characters")]
    Control,
    /// Holds an invisible format character: bidi overrides and isolates, zero-width
    /// characters, soft hyphens, byte-order marks (Unicode category Cf), or a line or
    /// paragraph separator.
    #[error("contains invisible format characters (bidi controls, zero-width characters)")]
    Format,
    /// Starts or ends with white space, which would make two spellings of one id.
    #[error("starts or ends with white space")]
    Padded,
}

/// Checks `value` as an identifier of at most `max_len` bytes.
pub fn check(value: &str, max_len: usize) -> Result<(), IdProblem> {
    if value.trim().is_empty() {
        return Err(IdProblem::Blank);
    }
    if value.len() > max_len {
        return Err(IdProblem::TooLong(max_len));
    }
    if value.trim() != value {
        return Err(IdProblem::Padded);
    }
    check_chars(value)
}

/// Checks free text (a reason, a detail): may be empty or padded, but carries no control
/// or invisible format characters.
pub fn check_text(value: &str, max_len: usize) -> Result<(), IdProblem> {
    if value.len() > max_len {
        return Err(IdProblem::TooLong(max_len));
    }
    check_chars(value)
}

fn check_chars(value: &str) -> Result<(), IdProblem> {
    for c in value.chars() {
        if c.is_control() {
            return Err(IdProblem::Control);
        }
        match c.general_category() {
            GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate => return Err(IdProblem::Format),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_pass() {
        for ok in [
            "diku",
            "import-42",
            "a b",
            "müller",
            "日本",
            "x.y_z:1",
            "inventory.*",
        ] {
            assert_eq!(check(ok, 200), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            ("", IdProblem::Blank),
            ("   ", IdProblem::Blank),
            ("\u{3000}", IdProblem::Blank),
            (" diku", IdProblem::Padded),
            ("diku ", IdProblem::Padded),
            ("a\u{0}b", IdProblem::Control),
            ("a\nb", IdProblem::Control),
            ("a\u{85}b", IdProblem::Control),
            ("job\u{202E}gpj.exe", IdProblem::Format),
            ("diku\u{200B}", IdProblem::Format),
            ("di\u{200D}ku", IdProblem::Format),
            ("\u{FEFF}diku", IdProblem::Format),
            ("a\u{2066}b", IdProblem::Format),
            ("a\u{AD}b", IdProblem::Format),
            ("a\u{2028}b", IdProblem::Format),
            ("a\u{E000}b", IdProblem::Format),
        ];
        for (value, want) in cases {
            assert_eq!(check(value, 200), Err(want), "{value:?}");
        }
        assert_eq!(check(&"x".repeat(201), 200), Err(IdProblem::TooLong(200)));
    }

    #[test]
    fn text_may_be_empty_but_not_invisible() {
        assert_eq!(check_text("", 10), Ok(()));
        assert_eq!(check_text(" user asked ", 20), Ok(()));
        assert_eq!(check_text("a\u{202E}b", 10), Err(IdProblem::Format));
    }
}
