pub mod compile;
pub mod diagnostic;
pub mod diff;
pub mod evaluate;
pub mod lint;
pub mod load;
pub mod model;
pub mod schema;

/// Test YAML indented with the code: strips the first (empty) line and the common
/// indentation. Line 1 of the result is the first line after the opening quote.
#[cfg(test)]
pub(crate) fn dedent(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}
