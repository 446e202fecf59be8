//! `{name}` templates for upstream URLs, cache keys and channel names, and `${NAME}` expansion for header
//! values. The poller renders a source's URL and channel from one set of parameters, and matches a subscribed
//! channel back to those parameters; the HTTP API turns [`TemplateError`] into a 400.

use std::collections::BTreeMap;
use std::fmt;

use crate::core::encoding::url_component;

/// A string with `{name}` placeholders, e.g. `https://api.example.com/chain?symbol={symbol}` or
/// `option-chain:{symbol}:{expiry}`. A name is one or more of `A-Z a-z 0-9 _`; braces cannot be escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template as written, kept for error messages and `Display`.
    source: String,
    /// Literal text and placeholders in order; two literals are never adjacent.
    segments: Vec<Segment>,
    /// Distinct placeholder names in order of first appearance.
    params: Vec<String>,
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Text copied as is.
    Literal(String),
    /// A placeholder, replaced by the parameter of that name.
    Param(String),
}

/// How a parameter value is written into a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Percent-encode every byte outside the URL-unreserved set `A-Z a-z 0-9 - _ . ~` (for URLs).
    Url,
    /// Insert the value unchanged (for cache keys and channel names).
    Raw,
}

/// Why a template could not be rendered; both cases are the caller's mistake (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// The template has this placeholder but no value was given for it.
    Missing(String),
    /// A value was given for a name that the template does not have.
    Unknown(String),
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Missing(name) => write!(f, "missing parameter `{name}`"),
            TemplateError::Unknown(name) => write!(f, "unknown parameter `{name}`"),
        }
    }
}

impl std::error::Error for TemplateError {}

impl Template {
    /// Parses a template. Errors (naming the template) on a `{` without its `}`, a `}` without its `{`, an
    /// empty name, or a name with characters outside `A-Z a-z 0-9 _`.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut params: Vec<String> = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(pos) = rest.find(['{', '}']) {
            let (before, from_brace) = rest.split_at(pos);
            literal.push_str(before);
            if from_brace.starts_with('}') {
                return Err(format!("template `{source}`: `}}` without a matching `{{`"));
            }
            let Some(end) = from_brace.find('}') else {
                return Err(format!("template `{source}`: `{{` without a matching `}}`"));
            };
            let name = &from_brace[1..end];
            if name.is_empty() {
                return Err(format!("template `{source}`: empty parameter name `{{}}`"));
            }
            if !is_valid_name(name) {
                return Err(format!(
                    "template `{source}`: invalid parameter name `{name}` (use A-Z a-z 0-9 _)"
                ));
            }
            if !literal.is_empty() {
                segments.push(Segment::Literal(std::mem::take(&mut literal)));
            }
            if !params.iter().any(|p| p == name) {
                params.push(name.to_owned());
            }
            segments.push(Segment::Param(name.to_owned()));
            rest = &from_brace[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Template {
            source: source.to_owned(),
            segments,
            params,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Distinct parameter names, in order of first appearance.
    pub fn params(&self) -> &[String] {
        &self.params
    }

    /// Fills every placeholder from `values`. Every parameter must be given, and nothing else: the first
    /// missing name (in template order) or else the first unknown name (in map order) is the error.
    pub fn render(
        &self,
        values: &BTreeMap<String, String>,
        encoding: Encoding,
    ) -> Result<String, TemplateError> {
        if let Some(missing) = self.params.iter().find(|p| !values.contains_key(*p)) {
            return Err(TemplateError::Missing(missing.clone()));
        }
        if let Some(unknown) = values.keys().find(|k| !self.params.contains(k)) {
            return Err(TemplateError::Unknown(unknown.clone()));
        }
        let mut out = String::with_capacity(self.source.len());
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::Param(name) => {
                    // Present: every parameter was checked against `values` above.
                    let value = &values[name];
                    match encoding {
                        Encoding::Raw => out.push_str(value),
                        Encoding::Url => out.extend(url_component(value)),
                    }
                }
            }
        }
        Ok(out)
    }

    /// The inverse of a raw render for channel templates: `option-chain:{symbol}:{expiry}` matches
    /// `option-chain:NIFTY:2025-11-28` with `symbol=NIFTY, expiry=2025-11-28`. Literal parts must match
    /// exactly; a value is non-empty and never contains `:`; a name used twice must take the same value
    /// both times. When two placeholders touch (`{a}{b}`), the earlier one takes the shortest value.
    pub fn match_channel(&self, channel: &str) -> Option<BTreeMap<String, String>> {
        let mut bound = BTreeMap::new();
        match_from(&self.segments, channel, &mut bound).then_some(bound)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Template {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Template::parse(s)
    }
}

/// Whether `name` is a valid parameter (or environment variable) name: `[A-Za-z0-9_]+`.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Backtracking matcher behind [`Template::match_channel`]; channel names are short, so trying each split
/// is cheap. On failure `bound` may hold partial bindings, which the caller discards.
fn match_from(segments: &[Segment], input: &str, bound: &mut BTreeMap<String, String>) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return input.is_empty();
    };
    match first {
        Segment::Literal(text) => input
            .strip_prefix(text.as_str())
            .is_some_and(|after| match_from(rest, after, bound)),
        Segment::Param(name) => {
            if let Some(value) = bound.get(name) {
                let value = value.clone();
                return input
                    .strip_prefix(value.as_str())
                    .is_some_and(|after| match_from(rest, after, bound));
            }
            // A value stops at the first ':' at the latest.
            let limit = input.find(':').unwrap_or(input.len());
            let candidates = input[..limit].char_indices().map(|(i, c)| i + c.len_utf8());
            for end in candidates {
                bound.insert(name.clone(), input[..end].to_owned());
                if match_from(rest, &input[end..], bound) {
                    return true;
                }
            }
            bound.remove(name);
            false
        }
    }
}

/// Replaces every `${NAME}` in `s` with the value of that environment variable (for header values such as
/// `Bearer ${API_TOKEN}`). A `$` not followed by `{` is kept as is. Errors name a variable that is not set
/// (or not valid UTF-8), or a malformed `${...}`.
pub fn expand_env(s: &str) -> Result<String, String> {
    expand_with(s, |name| std::env::var(name).ok())
}

/// [`expand_env`] with the variables looked up by `lookup` instead of the process environment.
pub fn expand_with(
    s: &str,
    mut lookup: impl FnMut(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find("${") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("`${{` without a closing `}}` in `{s}`"));
        };
        let name = &after[..end];
        if !is_valid_name(name) {
            return Err(format!(
                "invalid variable name `{name}` in `{s}` (use A-Z a-z 0-9 _)"
            ));
        }
        match lookup(name) {
            Some(value) => out.push_str(&value),
            None => return Err(format!("environment variable `{name}` is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_params_in_order_without_duplicates() {
        let t = Template::parse("https://x.test/{b}/{a}?again={b}&c={c_1}").unwrap();
        assert_eq!(t.params(), ["b", "a", "c_1"]);
        assert_eq!(t.as_str(), "https://x.test/{b}/{a}?again={b}&c={c_1}");
        assert_eq!(t.to_string(), t.as_str());
    }

    #[test]
    fn template_without_params() {
        let t = Template::parse("prices").unwrap();
        assert!(t.params().is_empty());
        assert_eq!(t.render(&map(&[]), Encoding::Raw).unwrap(), "prices");
        assert_eq!(Template::parse("").unwrap().params().len(), 0);
    }

    #[test]
    fn parse_errors() {
        for (bad, needle) in [
            ("a{b", "without a matching `}`"),
            ("a}b", "without a matching `{`"),
            ("a{b}}", "without a matching `{`"),
            ("{}", "empty parameter name"),
            ("x{a-b}", "invalid parameter name `a-b`"),
            ("x{a{b}}", "invalid parameter name `a{b`"),
            ("{ a}", "invalid parameter name ` a`"),
        ] {
            let err = Template::parse(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
            assert!(err.contains(bad), "error names the template: {err}");
        }
    }

    #[test]
    fn renders_url_with_percent_encoding() {
        let t = Template::parse("https://api.example.com/chain?symbol={symbol}&expiry={expiry}")
            .unwrap();
        let url = t
            .render(
                &map(&[("symbol", "S&P 500/é"), ("expiry", "2025-11-28")]),
                Encoding::Url,
            )
            .unwrap();
        assert_eq!(
            url,
            "https://api.example.com/chain?symbol=S%26P%20500%2F%C3%A9&expiry=2025-11-28"
        );
        let kept = t
            .render(
                &map(&[("symbol", "aZ09-_.~"), ("expiry", "")]),
                Encoding::Url,
            )
            .unwrap();
        assert!(kept.ends_with("symbol=aZ09-_.~&expiry="));
    }

    #[test]
    fn renders_raw_and_repeats() {
        let t = Template::parse("option-chain:{symbol}:{expiry}:{symbol}").unwrap();
        let key = t
            .render(
                &map(&[("symbol", "NIFTY 50"), ("expiry", "2025-11-28")]),
                Encoding::Raw,
            )
            .unwrap();
        assert_eq!(key, "option-chain:NIFTY 50:2025-11-28:NIFTY 50");
    }

    #[test]
    fn render_reports_missing_then_unknown() {
        let t = Template::parse("c:{a}:{b}").unwrap();
        assert_eq!(
            t.render(&map(&[("a", "1")]), Encoding::Raw),
            Err(TemplateError::Missing("b".into()))
        );
        assert_eq!(
            t.render(&map(&[("a", "1"), ("zz", "2")]), Encoding::Raw),
            Err(TemplateError::Missing("b".into()))
        );
        assert_eq!(
            t.render(&map(&[("a", "1"), ("b", "2"), ("zz", "3")]), Encoding::Url),
            Err(TemplateError::Unknown("zz".into()))
        );
        assert_eq!(
            TemplateError::Missing("b".into()).to_string(),
            "missing parameter `b`"
        );
        assert_eq!(
            TemplateError::Unknown("zz".into()).to_string(),
            "unknown parameter `zz`"
        );
    }

    #[test]
    fn matches_channel_back_to_params() {
        let t = Template::parse("option-chain:{symbol}:{expiry}").unwrap();
        assert_eq!(
            t.match_channel("option-chain:NIFTY:2025-11-28"),
            Some(map(&[("symbol", "NIFTY"), ("expiry", "2025-11-28")]))
        );
        // Round trip with render.
        let values = map(&[("symbol", "BANK NIFTY"), ("expiry", "2025-12-31")]);
        let channel = t.render(&values, Encoding::Raw).unwrap();
        assert_eq!(t.match_channel(&channel), Some(values));
    }

    #[test]
    fn channel_mismatches() {
        let t = Template::parse("option-chain:{symbol}:{expiry}").unwrap();
        for channel in [
            "option-chain:NIFTY",             // too few parts
            "option-chain:NIFTY:2025:11",     // a value cannot hold ':'
            "option-chain::2025-11-28",       // empty value
            "option-chain:NIFTY:",            // empty value at the end
            "Option-chain:NIFTY:2025-11-28",  // literal is case-sensitive
            "xoption-chain:NIFTY:2025-11-28", // literal must start the channel
            "option-chain:NIFTY:2025-11-28:", // trailing text
            "prices:NIFTY:2025-11-28",        // other literal
        ] {
            assert_eq!(t.match_channel(channel), None, "{channel}");
        }
    }

    #[test]
    fn channel_literals_between_and_after_params() {
        let t = Template::parse("px.{base}-{quote}.live").unwrap();
        assert_eq!(
            t.match_channel("px.BTC-USD.live"),
            Some(map(&[("base", "BTC"), ("quote", "USD")]))
        );
        // Backtracking: the first '-' is inside `base`'s value only if nothing else fits.
        assert_eq!(
            t.match_channel("px.A-B-C.live"),
            Some(map(&[("base", "A"), ("quote", "B-C")]))
        );
        assert_eq!(t.match_channel("px.BTC-USD.dead"), None);

        let fixed = Template::parse("prices").unwrap();
        assert_eq!(fixed.match_channel("prices"), Some(BTreeMap::new()));
        assert_eq!(fixed.match_channel("prices:x"), None);
    }

    #[test]
    fn repeated_param_must_match_the_same_value() {
        let t = Template::parse("{a}:{b}:{a}").unwrap();
        assert_eq!(
            t.match_channel("x:y:x"),
            Some(map(&[("a", "x"), ("b", "y")]))
        );
        assert_eq!(t.match_channel("x:y:z"), None);
    }

    #[test]
    fn adjacent_params_first_takes_shortest() {
        let t = Template::parse("{a}{b}").unwrap();
        assert_eq!(
            t.match_channel("xyz"),
            Some(map(&[("a", "x"), ("b", "yz")]))
        );
        assert_eq!(t.match_channel("x"), None);
        // Multi-byte characters are split on character boundaries.
        assert_eq!(t.match_channel("éà"), Some(map(&[("a", "é"), ("b", "à")])));
    }

    #[test]
    fn expands_variables_with_lookup() {
        let lookup = |name: &str| match name {
            "TOKEN" => Some("s3cr3t".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(
            expand_with("Bearer ${TOKEN}", lookup).unwrap(),
            "Bearer s3cr3t"
        );
        assert_eq!(
            expand_with("${TOKEN}${EMPTY}-${TOKEN}", lookup).unwrap(),
            "s3cr3t-s3cr3t"
        );
        assert_eq!(
            expand_with("cost: $5 {x} $ {", lookup).unwrap(),
            "cost: $5 {x} $ {"
        );
        assert_eq!(
            expand_with("${NOPE}", lookup).unwrap_err(),
            "environment variable `NOPE` is not set"
        );
        assert!(
            expand_with("${TOKEN", lookup)
                .unwrap_err()
                .contains("without a closing")
        );
        assert!(
            expand_with("${}", lookup)
                .unwrap_err()
                .contains("invalid variable name ``")
        );
        assert!(
            expand_with("${A-B}", lookup)
                .unwrap_err()
                .contains("invalid variable name `A-B`")
        );
    }

    #[test]
    fn expands_from_the_process_environment() {
        // PATH is set for any process that runs cargo; nothing here sets variables, which would race
        // with the other tests' threads.
        let path = std::env::var("PATH").expect("PATH is set");
        assert_eq!(expand_env("p=${PATH}").unwrap(), format!("p={path}"));
        let err = expand_env("${RELAYHUB_TEST_VARIABLE_THAT_IS_NEVER_SET}").unwrap_err();
        assert!(
            err.contains("RELAYHUB_TEST_VARIABLE_THAT_IS_NEVER_SET"),
            "{err}"
        );
        assert_eq!(expand_env("plain").unwrap(), "plain");
    }
}
