//! serde's `rename_all` rules, as serde applies them to variant names.

/// A `rename_all` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RenameRule {
    Lower,
    Upper,
    Pascal,
    Camel,
    Snake,
    ScreamingSnake,
    Kebab,
    ScreamingKebab,
}

impl RenameRule {
    /// The rule serde names `name`.
    pub(crate) fn from_str(name: &str) -> Option<Self> {
        Some(match name {
            "lowercase" => Self::Lower,
            "UPPERCASE" => Self::Upper,
            "PascalCase" => Self::Pascal,
            "camelCase" => Self::Camel,
            "snake_case" => Self::Snake,
            "SCREAMING_SNAKE_CASE" => Self::ScreamingSnake,
            "kebab-case" => Self::Kebab,
            "SCREAMING-KEBAB-CASE" => Self::ScreamingKebab,
            _ => return None,
        })
    }

    /// The name of a variant called `variant` (PascalCase in Rust) under
    /// this rule.
    pub(crate) fn apply(self, variant: &str) -> String {
        match self {
            Self::Pascal => variant.to_owned(),
            Self::Lower => variant.to_ascii_lowercase(),
            Self::Upper => variant.to_ascii_uppercase(),
            Self::Camel => {
                let mut chars = variant.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_lowercase().to_string() + chars.as_str()
                })
            }
            Self::Snake => {
                let mut snake = String::new();
                for (i, ch) in variant.char_indices() {
                    if i > 0 && ch.is_uppercase() {
                        snake.push('_');
                    }
                    snake.push(ch.to_ascii_lowercase());
                }
                snake
            }
            Self::ScreamingSnake => Self::Snake.apply(variant).to_ascii_uppercase(),
            Self::Kebab => Self::Snake.apply(variant).replace('_', "-"),
            Self::ScreamingKebab => Self::ScreamingSnake.apply(variant).replace('_', "-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RenameRule;

    /// The table serde's own tests pin for variants.
    #[test]
    fn rules_rename_variants_as_serde_does() {
        let cases = [
            (
                "Outcome", "outcome", "OUTCOME", "outcome", "outcome", "OUTCOME", "outcome",
                "OUTCOME",
            ),
            (
                "VeryTasty",
                "verytasty",
                "VERYTASTY",
                "veryTasty",
                "very_tasty",
                "VERY_TASTY",
                "very-tasty",
                "VERY-TASTY",
            ),
            ("A", "a", "A", "a", "a", "A", "a", "A"),
            ("Z42", "z42", "Z42", "z42", "z42", "Z42", "z42", "Z42"),
        ];
        for (original, lower, upper, camel, snake, screaming, kebab, screaming_kebab) in cases {
            assert_eq!(RenameRule::Pascal.apply(original), original);
            assert_eq!(RenameRule::Lower.apply(original), lower);
            assert_eq!(RenameRule::Upper.apply(original), upper);
            assert_eq!(RenameRule::Camel.apply(original), camel);
            assert_eq!(RenameRule::Snake.apply(original), snake);
            assert_eq!(RenameRule::ScreamingSnake.apply(original), screaming);
            assert_eq!(RenameRule::Kebab.apply(original), kebab);
            assert_eq!(RenameRule::ScreamingKebab.apply(original), screaming_kebab);
        }
        assert_eq!(RenameRule::from_str("camelCase"), Some(RenameRule::Camel));
        assert_eq!(RenameRule::from_str("camel"), None);
    }
}
