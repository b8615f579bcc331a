//! Segment rules: boolean expressions over one user's features, compiled once at start.
//!
//! ```text
//! rule := or
//! or   := and (("||" | "or") and)*
//! and  := not (("&&" | "and") not)*
//! not  := ("!" | "not") not | "(" or ")" | test
//! test := atom (("==" | "!=" | "<" | "<=" | ">" | ">=") atom | "in" atom)?
//! atom := field | number | string | "true" | "false"
//! ```
//!
//! Rules come from the config file, so every error carries the 1-based column (in chars, not
//! bytes) where it was found: an operator fixes a rule by looking at one place. Compiling
//! resolves fields and hashes strings, so evaluation reads features and compares, and never
//! allocates.

use crate::event::Device;
use std::fmt;

/// Where and why a rule failed to compile. Display: "column {column}: {message}".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// 1-based, in chars; one past the last char when the rule ends too early.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl std::error::Error for RuleError {}

/// A numeric feature a rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Number {
    EventCount,
    FirstSeen,
    LastSeen,
    DistinctItems,
    TotalSpend,
    EngagementScore,
    SessionsCount,
    SessionsAvgDuration,
    CurrentStart,
    CurrentLast,
    CurrentEvents,
    /// All-time count of a type (hash of the type name).
    Count(u64),
    /// Count of a type (hash) in the window with this index into the `windows` given to compile.
    Window(usize, u64),
}

/// What a rule is evaluated against: one user's features at one time.
pub trait Fields {
    /// Absent counts must read as 0: profiles omit zero counts, rules don't know that.
    fn number(&self, field: Number) -> f64;
    fn last_device(&self) -> Option<Device>;
    fn has_device(&self, device: Device) -> bool;
    /// Whether the category (hash of its name) is among the user's top categories.
    fn in_top_categories(&self, category: u64) -> bool;
    /// Whether the item (hash of its id) is among the user's recent items.
    fn in_recent_items(&self, item: u64) -> bool;
}

/// Which inputs a set of rules needs, so the engine computes only those.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// `(window index, type hash)` of every window count some rule reads, sorted,
    /// deduplicated: the engine keeps no window facts for the other types.
    pub windows: Vec<(usize, u64)>,
    /// `engagement_score` is read.
    pub engagement: bool,
    /// `in top_categories`.
    pub top_categories: bool,
    /// `in devices`.
    pub devices: bool,
    /// Type hashes of the `counts.<type>` some rule reads, sorted, deduplicated.
    pub counts: Vec<u64>,
}

impl Needs {
    pub fn merge(&mut self, other: &Needs) {
        self.windows.extend_from_slice(&other.windows);
        self.windows.sort_unstable();
        self.windows.dedup();
        self.engagement |= other.engagement;
        self.top_categories |= other.top_categories;
        self.devices |= other.devices;
        self.counts.extend_from_slice(&other.counts);
        self.counts.sort_unstable();
        self.counts.dedup();
    }
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    text: String,
    root: Node,
}

impl Rule {
    /// `windows`: the configured window labels in config order ("1h", "24h", "7d").
    /// `hash`: maps a type name, category name or item id to its u64 key (the engine's own
    /// string hash; also called so the engine remembers the string).
    pub fn compile(
        text: &str,
        windows: &[&str],
        hash: &mut dyn FnMut(&str) -> u64,
    ) -> Result<Rule, RuleError> {
        let chars: Vec<char> = text.chars().collect();
        let tokens = lex(&chars)?;
        if tokens.is_empty() {
            return Err(error(1, "empty rule"));
        }
        let mut parser = Parser {
            tokens: &tokens,
            pos: 0,
            end: chars.len() + 1,
        };
        let raw = parser.or(0)?;
        if let Some(t) = parser.peek() {
            return Err(match t.tok {
                Tok::RParen => error(t.col, "unmatched `)`"),
                _ => error(
                    t.col,
                    format!(
                        "expected `&&`, `||` or the end of the rule, found `{}`",
                        t.text
                    ),
                ),
            });
        }
        let root = Checker { windows, hash }.check(&raw)?;
        Ok(Rule {
            text: text.to_owned(),
            root,
        })
    }

    pub fn eval(&self, fields: &dyn Fields) -> bool {
        self.root.eval(fields)
    }

    pub fn needs(&self) -> Needs {
        let mut needs = Needs::default();
        self.root.needs(&mut needs);
        needs.windows.sort_unstable();
        needs.windows.dedup();
        needs.counts.sort_unstable();
        needs.counts.dedup();
        needs
    }

    /// The source text, as given.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Bounds parser and evaluator recursion, so a hostile rule is an error, not a stack overflow.
/// `&&`/`||` chains are n-ary nodes and do not count; only `(` and `!` nest.
const MAX_DEPTH: usize = 64;

const DEVICES: &str = "desktop, mobile, tablet, other";

const FIELD_FORMS: &str = "event_count, first_seen_ms, last_seen_ms, distinct_items, \
    total_spend, engagement_score, sessions.count, sessions.avg_duration_ms, \
    sessions.current.start_ms, sessions.current.last_ms, sessions.current.events, \
    counts.<type>, windows.<label>.<type>, last_device, devices, top_categories, recent_items";

fn error(column: usize, message: impl Into<String>) -> RuleError {
    RuleError {
        column,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    /// The operator that keeps the meaning when the sides swap: `1 <= x` is `x >= 1`.
    fn mirror(self) -> Op {
        match self {
            Op::Eq => Op::Eq,
            Op::Ne => Op::Ne,
            Op::Lt => Op::Gt,
            Op::Le => Op::Ge,
            Op::Gt => Op::Lt,
            Op::Ge => Op::Le,
        }
    }

    fn apply(self, a: f64, b: f64) -> bool {
        match self {
            Op::Eq => a == b,
            Op::Ne => a != b,
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
        }
    }
}

/// The compiled form: fields resolved, strings hashed.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Const(bool),
    Any(Vec<Node>),
    All(Vec<Node>),
    Not(Box<Node>),
    Compare {
        field: Number,
        op: Op,
        value: f64,
    },
    /// `last_device == d` (`equal`) or `!= d`; no last device equals no device.
    LastDevice {
        device: Device,
        equal: bool,
    },
    HasDevice(Device),
    TopCategory(u64),
    RecentItem(u64),
}

impl Node {
    fn eval(&self, f: &dyn Fields) -> bool {
        match self {
            Node::Const(b) => *b,
            Node::Any(nodes) => nodes.iter().any(|n| n.eval(f)),
            Node::All(nodes) => nodes.iter().all(|n| n.eval(f)),
            Node::Not(n) => !n.eval(f),
            Node::Compare { field, op, value } => op.apply(f.number(*field), *value),
            Node::LastDevice { device, equal } => (f.last_device() == Some(*device)) == *equal,
            Node::HasDevice(d) => f.has_device(*d),
            Node::TopCategory(c) => f.in_top_categories(*c),
            Node::RecentItem(i) => f.in_recent_items(*i),
        }
    }

    fn needs(&self, needs: &mut Needs) {
        match self {
            Node::Any(nodes) | Node::All(nodes) => nodes.iter().for_each(|n| n.needs(needs)),
            Node::Not(n) => n.needs(needs),
            Node::Compare { field, .. } => match field {
                Number::EngagementScore => needs.engagement = true,
                Number::Count(kind) => needs.counts.push(*kind),
                Number::Window(w, kind) => needs.windows.push((*w, *kind)),
                _ => {}
            },
            Node::HasDevice(_) => needs.devices = true,
            Node::TopCategory(_) => needs.top_categories = true,
            Node::Const(_) | Node::LastDevice { .. } | Node::RecentItem(_) => {}
        }
    }
}

// ---- lexing ----

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Or,
    And,
    Not,
    In,
    Cmp(Op),
    LParen,
    RParen,
    Num(f64),
    Str(String),
    Bool(bool),
    Path(String),
}

#[derive(Debug)]
struct Token {
    tok: Tok,
    col: usize,
    /// The source slice, for messages.
    text: String,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn lex(chars: &[char]) -> Result<Vec<Token>, RuleError> {
    let at = |i: usize| chars.get(i).copied();
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(c) = at(i) {
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let col = i + 1;
        let next = at(i + 1);
        let tok = match c {
            '(' | ')' => {
                i += 1;
                if c == '(' {
                    Tok::LParen
                } else {
                    Tok::RParen
                }
            }
            '|' | '&' if next == Some(c) => {
                i += 2;
                if c == '|' {
                    Tok::Or
                } else {
                    Tok::And
                }
            }
            '|' => return Err(error(col, "unexpected `|`; use `||` or `or`")),
            '&' => return Err(error(col, "unexpected `&`; use `&&` or `and`")),
            '=' if next == Some('=') => {
                i += 2;
                Tok::Cmp(Op::Eq)
            }
            '=' => return Err(error(col, "unexpected `=`; use `==` to compare")),
            '!' | '<' | '>' => {
                let eq = next == Some('=');
                i += if eq { 2 } else { 1 };
                match (c, eq) {
                    ('!', true) => Tok::Cmp(Op::Ne),
                    ('!', false) => Tok::Not,
                    ('<', true) => Tok::Cmp(Op::Le),
                    ('<', false) => Tok::Cmp(Op::Lt),
                    (_, true) => Tok::Cmp(Op::Ge),
                    (_, false) => Tok::Cmp(Op::Gt),
                }
            }
            '"' | '\'' => {
                let (s, end) = lex_string(chars, i)?;
                i = end;
                Tok::Str(s)
            }
            '-' | '0'..='9' => {
                let (n, end) = lex_number(chars, i)?;
                i = end;
                Tok::Num(n)
            }
            c if c.is_ascii_alphabetic() => {
                i = lex_path(chars, i)?;
                let text: String = chars[start..i].iter().collect();
                match text.as_str() {
                    "or" => Tok::Or,
                    "and" => Tok::And,
                    "not" => Tok::Not,
                    "in" => Tok::In,
                    "true" => Tok::Bool(true),
                    "false" => Tok::Bool(false),
                    _ => Tok::Path(text),
                }
            }
            other => return Err(error(col, format!("unexpected character `{other}`"))),
        };
        tokens.push(Token {
            tok,
            col,
            text: chars[start..i].iter().collect(),
        });
    }
    Ok(tokens)
}

/// A quoted string starting at `start`; returns its value and the index past the closing quote.
fn lex_string(chars: &[char], start: usize) -> Result<(String, usize), RuleError> {
    let quote = chars[start];
    let mut value = String::new();
    let mut i = start + 1;
    loop {
        match chars.get(i).copied() {
            None => return Err(error(start + 1, "unterminated string")),
            Some(c) if c == quote => return Ok((value, i + 1)),
            Some('\\') => {
                let escaped = match chars.get(i + 1).copied() {
                    None => return Err(error(start + 1, "unterminated string")),
                    Some(e @ ('\\' | '"' | '\'')) => e,
                    Some('n') => '\n',
                    Some('t') => '\t',
                    Some('r') => '\r',
                    Some(e) => {
                        return Err(error(
                            i + 1,
                            format!("unknown escape `\\{e}`; use \\\\, \\\", \\', \\n, \\t or \\r"),
                        ))
                    }
                };
                value.push(escaped);
                i += 2;
            }
            Some(c) => {
                value.push(c);
                i += 1;
            }
        }
    }
}

/// `-?digits(.digits)?([eE][+-]?digits)?`, not followed by a name char or `.`.
fn lex_number(chars: &[char], start: usize) -> Result<(f64, usize), RuleError> {
    let digit = |i: usize| chars.get(i).is_some_and(|c| c.is_ascii_digit());
    let digits_from = |mut i: usize| {
        while digit(i) {
            i += 1;
        }
        i
    };
    let mut i = start;
    if chars[i] == '-' {
        i += 1;
        if !digit(i) {
            return Err(error(start + 1, "expected a digit after `-`"));
        }
    }
    i = digits_from(i);
    if chars.get(i) == Some(&'.') && digit(i + 1) {
        i = digits_from(i + 1);
    }
    if matches!(chars.get(i), Some('e' | 'E')) {
        let mut j = i + 1;
        if matches!(chars.get(j), Some('+' | '-')) {
            j += 1;
        }
        if digit(j) {
            i = digits_from(j);
        }
    }
    if chars.get(i).is_some_and(|&c| is_name_char(c) || c == '.') {
        let mut end = i;
        while chars.get(end).is_some_and(|&c| is_name_char(c) || c == '.') {
            end += 1;
        }
        let text: String = chars[start..end].iter().collect();
        return Err(error(start + 1, format!("invalid number `{text}`")));
    }
    let text: String = chars[start..i].iter().collect();
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() => Ok((n, i)),
        _ => Err(error(start + 1, format!("number `{text}` is out of range"))),
    }
}

/// Dot-separated name segments; returns the index past the path.
fn lex_path(chars: &[char], start: usize) -> Result<usize, RuleError> {
    let name = |i: usize| chars.get(i).is_some_and(|&c| is_name_char(c));
    let mut i = start;
    loop {
        while name(i) {
            i += 1;
        }
        if chars.get(i) != Some(&'.') {
            return Ok(i);
        }
        if !name(i + 1) {
            return Err(error(i + 2, "expected a name after `.`"));
        }
        i += 1;
    }
}

// ---- parsing ----

#[derive(Debug)]
enum Value {
    Field(String),
    Num(f64),
    Str(String),
    Bool(bool),
}

#[derive(Debug)]
struct Atom {
    value: Value,
    col: usize,
}

/// The syntax tree, before fields are resolved: syntax errors are all found first, so
/// `a < b < c` reports the chaining, not the unknown field `a`.
#[derive(Debug)]
enum Raw {
    Any(Vec<Raw>),
    All(Vec<Raw>),
    Not(Box<Raw>),
    Atom(Atom),
    Cmp {
        left: Atom,
        op: Op,
        op_col: usize,
        right: Atom,
    },
    In {
        left: Atom,
        right: Atom,
    },
}

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
    /// Column reported when the rule ends too early.
    end: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    /// Consumes the next token if `is` accepts it; returns its column.
    fn eat(&mut self, is: fn(&Tok) -> bool) -> Option<usize> {
        let t = self.peek().filter(|t| is(&t.tok))?;
        let col = t.col;
        self.pos += 1;
        Some(col)
    }

    fn expected(&self, what: &str) -> RuleError {
        match self.peek() {
            Some(t) => error(t.col, format!("expected {what}, found `{}`", t.text)),
            None => error(
                self.end,
                format!("expected {what}, found the end of the rule"),
            ),
        }
    }

    fn enter(depth: usize, col: usize) -> Result<usize, RuleError> {
        if depth >= MAX_DEPTH {
            return Err(error(col, format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(depth + 1)
    }

    fn or(&mut self, depth: usize) -> Result<Raw, RuleError> {
        let first = self.and(depth)?;
        if self.peek().is_none_or(|t| t.tok != Tok::Or) {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat(|t| *t == Tok::Or).is_some() {
            items.push(self.and(depth)?);
        }
        Ok(Raw::Any(items))
    }

    fn and(&mut self, depth: usize) -> Result<Raw, RuleError> {
        let first = self.not(depth)?;
        if self.peek().is_none_or(|t| t.tok != Tok::And) {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat(|t| *t == Tok::And).is_some() {
            items.push(self.not(depth)?);
        }
        Ok(Raw::All(items))
    }

    fn not(&mut self, depth: usize) -> Result<Raw, RuleError> {
        if let Some(col) = self.eat(|t| *t == Tok::Not) {
            let depth = Self::enter(depth, col)?;
            return Ok(Raw::Not(Box::new(self.not(depth)?)));
        }
        if let Some(open) = self.eat(|t| *t == Tok::LParen) {
            let depth = Self::enter(depth, open)?;
            let inner = self.or(depth)?;
            match self.peek() {
                Some(t) if t.tok == Tok::RParen => self.pos += 1,
                Some(t) => {
                    return Err(error(
                        t.col,
                        format!(
                            "expected `)` to close the `(` at column {open}, found `{}`",
                            t.text
                        ),
                    ))
                }
                None => return Err(error(open, "`(` is never closed")),
            }
            if let Some(t) = self.peek().filter(|t| is_test(&t.tok)) {
                return Err(error(
                    t.col,
                    format!(
                        "`{}` needs a field or a literal on each side, not a parenthesized condition",
                        t.text
                    ),
                ));
            }
            return Ok(inner);
        }
        self.test()
    }

    fn test(&mut self) -> Result<Raw, RuleError> {
        let left = self.atom("a condition")?;
        let Some(t) = self.peek() else {
            return Ok(Raw::Atom(left));
        };
        let (col, text) = (t.col, t.text.clone());
        let raw = match t.tok {
            Tok::Cmp(op) => {
                self.pos += 1;
                let right = self.atom(&format!("a field or a literal after `{text}`"))?;
                Raw::Cmp {
                    left,
                    op,
                    op_col: col,
                    right,
                }
            }
            Tok::In => {
                self.pos += 1;
                let right = self.atom("a list field after `in`")?;
                Raw::In { left, right }
            }
            _ => return Ok(Raw::Atom(left)),
        };
        if let Some(t) = self.peek().filter(|t| is_test(&t.tok)) {
            return Err(error(
                t.col,
                format!(
                    "comparisons do not chain; join them with `&&` (found `{}` after a comparison)",
                    t.text
                ),
            ));
        }
        Ok(raw)
    }

    fn atom(&mut self, what: &str) -> Result<Atom, RuleError> {
        let Some(t) = self.peek() else {
            return Err(self.expected(what));
        };
        let value = match &t.tok {
            Tok::Path(p) => Value::Field(p.clone()),
            Tok::Num(n) => Value::Num(*n),
            Tok::Str(s) => Value::Str(s.clone()),
            Tok::Bool(b) => Value::Bool(*b),
            _ => return Err(self.expected(what)),
        };
        let col = t.col;
        self.pos += 1;
        Ok(Atom { value, col })
    }
}

fn is_test(tok: &Tok) -> bool {
    matches!(tok, Tok::Cmp(_) | Tok::In)
}

// ---- checking ----

#[derive(Debug, Clone, Copy)]
enum Kind {
    Number(Number),
    LastDevice,
    Devices,
    TopCategories,
    RecentItems,
}

struct Checker<'a, 'h> {
    windows: &'a [&'a str],
    hash: &'h mut dyn FnMut(&str) -> u64,
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Field(_) => "a field",
        Value::Num(_) => "a number",
        Value::Str(_) => "a string",
        Value::Bool(_) => "a boolean",
    }
}

fn device(name: &str, col: usize) -> Result<Device, RuleError> {
    match name {
        "desktop" => Ok(Device::Desktop),
        "mobile" => Ok(Device::Mobile),
        "tablet" => Ok(Device::Tablet),
        "other" => Ok(Device::Other),
        _ => Err(error(
            col,
            format!("unknown device `{name}`; expected one of {DEVICES}"),
        )),
    }
}

/// Event type names as the engine accepts them: `^[a-z][a-z0-9_]{0,63}$`.
fn valid_type(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Checker<'_, '_> {
    fn check(&mut self, raw: &Raw) -> Result<Node, RuleError> {
        Ok(match raw {
            Raw::Any(items) => Node::Any(self.check_all(items)?),
            Raw::All(items) => Node::All(self.check_all(items)?),
            Raw::Not(inner) => Node::Not(Box::new(self.check(inner)?)),
            Raw::Atom(atom) => match &atom.value {
                Value::Bool(b) => Node::Const(*b),
                Value::Field(path) => {
                    self.field(path, atom.col)?;
                    return Err(error(
                        atom.col,
                        format!("`{path}` is not a condition; compare it with a value"),
                    ));
                }
                other => {
                    return Err(error(
                        atom.col,
                        format!("{} is not a condition", describe(other)),
                    ))
                }
            },
            Raw::Cmp {
                left,
                op,
                op_col,
                right,
            } => match (&left.value, &right.value) {
                (Value::Field(l), Value::Field(r)) => {
                    self.field(l, left.col)?;
                    self.field(r, right.col)?;
                    return Err(error(
                        right.col,
                        "cannot compare two fields; one side must be a literal",
                    ));
                }
                (Value::Field(path), _) => self.compare(path, left.col, *op, *op_col, right)?,
                (_, Value::Field(path)) => {
                    self.compare(path, right.col, op.mirror(), *op_col, left)?
                }
                _ => {
                    return Err(error(
                        right.col,
                        "cannot compare two literals; one side must be a field",
                    ))
                }
            },
            Raw::In { left, right } => self.member(left, right)?,
        })
    }

    fn check_all(&mut self, items: &[Raw]) -> Result<Vec<Node>, RuleError> {
        items.iter().map(|r| self.check(r)).collect()
    }

    fn compare(
        &mut self,
        path: &str,
        col: usize,
        op: Op,
        op_col: usize,
        literal: &Atom,
    ) -> Result<Node, RuleError> {
        match self.field(path, col)? {
            Kind::Number(field) => match literal.value {
                Value::Num(value) => Ok(Node::Compare { field, op, value }),
                ref other => Err(error(
                    literal.col,
                    format!(
                        "`{path}` is a number; compare it with a number, not {}",
                        describe(other)
                    ),
                )),
            },
            Kind::LastDevice => {
                let equal = match op {
                    Op::Eq => true,
                    Op::Ne => false,
                    _ => {
                        return Err(error(
                            op_col,
                            "`last_device` can only be compared with `==` or `!=`",
                        ))
                    }
                };
                match &literal.value {
                    Value::Str(s) => Ok(Node::LastDevice {
                        device: device(s, literal.col)?,
                        equal,
                    }),
                    other => Err(error(
                        literal.col,
                        format!(
                            "`last_device` is text; compare it with a quoted device name \
                             ({DEVICES}), not {}",
                            describe(other)
                        ),
                    )),
                }
            }
            Kind::Devices | Kind::TopCategories | Kind::RecentItems => Err(error(
                col,
                format!("`{path}` is a list; test membership with `\"...\" in {path}`"),
            )),
        }
    }

    fn member(&mut self, left: &Atom, right: &Atom) -> Result<Node, RuleError> {
        let Value::Str(s) = &left.value else {
            return Err(error(
                left.col,
                format!(
                    "the left side of `in` must be a string literal, not {}",
                    describe(&left.value)
                ),
            ));
        };
        let not_list = || {
            error(
                right.col,
                "the right side of `in` must be a list: devices, top_categories or recent_items",
            )
        };
        let Value::Field(path) = &right.value else {
            return Err(not_list());
        };
        match self.field(path, right.col)? {
            Kind::Devices => Ok(Node::HasDevice(device(s, left.col)?)),
            Kind::TopCategories => Ok(Node::TopCategory((self.hash)(s))),
            Kind::RecentItems if s.is_empty() => {
                Err(error(left.col, "an item id must not be empty"))
            }
            Kind::RecentItems => Ok(Node::RecentItem((self.hash)(s))),
            Kind::Number(_) | Kind::LastDevice => Err(not_list()),
        }
    }

    /// Resolves a path; hashes a type name only once the whole path is valid.
    fn field(&mut self, path: &str, col: usize) -> Result<Kind, RuleError> {
        let number = |n| Ok(Kind::Number(n));
        match path {
            "event_count" => return number(Number::EventCount),
            "first_seen_ms" => return number(Number::FirstSeen),
            "last_seen_ms" => return number(Number::LastSeen),
            "distinct_items" => return number(Number::DistinctItems),
            "total_spend" => return number(Number::TotalSpend),
            "engagement_score" => return number(Number::EngagementScore),
            "sessions.count" => return number(Number::SessionsCount),
            "sessions.avg_duration_ms" => return number(Number::SessionsAvgDuration),
            "sessions.current.start_ms" => return number(Number::CurrentStart),
            "sessions.current.last_ms" => return number(Number::CurrentLast),
            "sessions.current.events" => return number(Number::CurrentEvents),
            "last_device" => return Ok(Kind::LastDevice),
            "devices" => return Ok(Kind::Devices),
            "top_categories" => return Ok(Kind::TopCategories),
            "recent_items" => return Ok(Kind::RecentItems),
            _ => {}
        }
        // Paths are ASCII (the lexer only accepts ASCII name chars), so a segment's column is
        // the path's column plus the byte length before it.
        let segments: Vec<&str> = path.split('.').collect();
        let type_key = |this: &mut Self, ty: &str, col: usize| {
            if !valid_type(ty) {
                return Err(error(
                    col,
                    format!("invalid event type `{ty}`: must match ^[a-z][a-z0-9_]{{0,63}}$"),
                ));
            }
            Ok((this.hash)(ty))
        };
        match segments.as_slice() {
            ["counts", ty] => {
                let key = type_key(self, ty, col + "counts.".len())?;
                Ok(Kind::Number(Number::Count(key)))
            }
            ["windows", label, ty] => {
                let label_col = col + "windows.".len();
                let Some(w) = self.windows.iter().position(|w| w == label) else {
                    let known = if self.windows.is_empty() {
                        "no windows are configured".to_owned()
                    } else {
                        format!("configured windows: {}", self.windows.join(", "))
                    };
                    return Err(error(
                        label_col,
                        format!("unknown window `{label}`; {known}"),
                    ));
                };
                let key = type_key(self, ty, label_col + label.len() + 1)?;
                Ok(Kind::Number(Number::Window(w, key)))
            }
            _ => Err(error(
                col,
                format!("unknown field `{path}`; expected one of {FIELD_FORMS}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    const WINDOWS: &[&str] = &["1h", "24h", "7d"];

    fn fnv(s: &str) -> u64 {
        s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    fn compile(text: &str) -> Result<Rule, RuleError> {
        Rule::compile(text, WINDOWS, &mut fnv)
    }

    fn rule(text: &str) -> Rule {
        match compile(text) {
            Ok(r) => r,
            Err(e) => panic!("{text:?} should compile: {e}"),
        }
    }

    fn err(text: &str) -> RuleError {
        match compile(text) {
            Ok(r) => panic!("{text:?} should not compile: {r:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error column and that the message mentions `part`.
    fn assert_err(text: &str, column: usize, part: &str) {
        let e = err(text);
        assert_eq!(e.column, column, "{text:?}: {e}");
        assert!(e.message.contains(part), "{text:?}: {e} lacks {part:?}");
    }

    #[derive(Default)]
    struct User {
        numbers: HashMap<Number, f64>,
        last_device: Option<Device>,
        devices: HashSet<Device>,
        top: HashSet<u64>,
        recent: HashSet<u64>,
    }

    impl User {
        fn set(mut self, field: Number, value: f64) -> Self {
            self.numbers.insert(field, value);
            self
        }
        fn count(self, ty: &str, n: f64) -> Self {
            self.set(Number::Count(fnv(ty)), n)
        }
        fn window(self, label: &str, ty: &str, n: f64) -> Self {
            let w = WINDOWS
                .iter()
                .position(|l| *l == label)
                .expect("test window");
            self.set(Number::Window(w, fnv(ty)), n)
        }
        fn device(mut self, d: Device) -> Self {
            self.last_device = Some(d);
            self.devices.insert(d);
            self
        }
        fn category(mut self, c: &str) -> Self {
            self.top.insert(fnv(c));
            self
        }
        fn item(mut self, i: &str) -> Self {
            self.recent.insert(fnv(i));
            self
        }
    }

    impl Fields for User {
        fn number(&self, field: Number) -> f64 {
            self.numbers.get(&field).copied().unwrap_or(0.0)
        }
        fn last_device(&self) -> Option<Device> {
            self.last_device
        }
        fn has_device(&self, device: Device) -> bool {
            self.devices.contains(&device)
        }
        fn in_top_categories(&self, category: u64) -> bool {
            self.top.contains(&category)
        }
        fn in_recent_items(&self, item: u64) -> bool {
            self.recent.contains(&item)
        }
    }

    fn eval(text: &str, user: &User) -> bool {
        rule(text).eval(user)
    }

    #[test]
    fn brief_examples_evaluate() {
        let cart = "windows.24h.add_to_cart >= 1 && windows.24h.purchase == 0";
        let carted = User::default().window("24h", "add_to_cart", 2.0);
        assert!(eval(cart, &carted));
        assert!(!eval(cart, &carted.window("24h", "purchase", 1.0)));
        assert!(!eval(
            cart,
            &User::default().window("1h", "add_to_cart", 1.0)
        ));

        let buyer = "counts.purchase >= 3";
        assert!(eval(buyer, &User::default().count("purchase", 3.0)));
        assert!(!eval(buyer, &User::default().count("purchase", 2.0)));

        let mobile = "last_device == \"mobile\"";
        assert!(eval(mobile, &User::default().device(Device::Mobile)));
        assert!(!eval(mobile, &User::default().device(Device::Desktop)));

        let shoes = "\"shoes\" in top_categories";
        assert!(eval(shoes, &User::default().category("shoes")));
        assert!(!eval(shoes, &User::default().category("hats")));

        let engaged = "engagement_score > 50 || !(sessions.count < 2)";
        let score = |s| User::default().set(Number::EngagementScore, s);
        assert!(eval(engaged, &score(51.0)));
        assert!(!eval(engaged, &score(50.0)));
        assert!(eval(engaged, &score(0.0).set(Number::SessionsCount, 2.0)));
        assert!(!eval(engaged, &score(0.0).set(Number::SessionsCount, 1.0)));
    }

    #[test]
    fn every_number_field_resolves() {
        let fields = [
            ("event_count", Number::EventCount),
            ("first_seen_ms", Number::FirstSeen),
            ("last_seen_ms", Number::LastSeen),
            ("distinct_items", Number::DistinctItems),
            ("total_spend", Number::TotalSpend),
            ("engagement_score", Number::EngagementScore),
            ("sessions.count", Number::SessionsCount),
            ("sessions.avg_duration_ms", Number::SessionsAvgDuration),
            ("sessions.current.start_ms", Number::CurrentStart),
            ("sessions.current.last_ms", Number::CurrentLast),
            ("sessions.current.events", Number::CurrentEvents),
            ("counts.view", Number::Count(fnv("view"))),
            ("windows.7d.view", Number::Window(2, fnv("view"))),
        ];
        for (name, field) in fields {
            let r = rule(&format!("{name} == 7"));
            assert!(r.eval(&User::default().set(field, 7.0)), "{name}");
            assert!(!r.eval(&User::default().set(field, 8.0)), "{name}");
        }
    }

    #[test]
    fn and_binds_tighter_than_or() {
        // a || b && c  ==  a || (b && c)
        let text = "counts.a >= 1 || counts.b >= 1 && counts.c >= 1";
        let a = User::default().count("a", 1.0);
        assert!(eval(text, &a));
        let b = User::default().count("b", 1.0);
        assert!(!eval(text, &b));
        assert!(eval(text, &b.count("c", 1.0)));
        // Parentheses override it.
        let grouped = "(counts.a >= 1 || counts.b >= 1) && counts.c >= 1";
        assert!(!eval(grouped, &User::default().count("a", 1.0)));
        // Keyword forms parse the same.
        let words = "counts.a >= 1 or counts.b >= 1 and counts.c >= 1";
        assert!(eval(words, &User::default().count("a", 1.0)));
        assert!(!eval(words, &User::default().count("b", 1.0)));
    }

    #[test]
    fn not_and_bang() {
        let u = User::default().count("a", 1.0);
        assert!(
            !eval("!counts.a >= 1", &u),
            "`!` is looser than a comparison"
        );
        assert!(!eval("not counts.a >= 1", &u));
        assert!(eval("!!counts.a >= 1", &u));
        assert!(eval("not not counts.a >= 1", &u));
        assert!(eval("!(counts.a >= 1 && counts.b >= 1)", &u));
        assert!(eval("not \"mobile\" in devices", &u));
        // `!` binds tighter than `&&`.
        assert!(!eval("!counts.b >= 1 && counts.a >= 2", &u));
        assert!(eval("!true || true", &u));
        assert!(!eval("!(true || true)", &u));
    }

    #[test]
    fn literals() {
        let u = User::default()
            .set(Number::TotalSpend, 1000.0)
            .set(Number::EngagementScore, -2.0)
            .set(Number::SessionsAvgDuration, 0.5);
        assert!(eval("total_spend == 1e3", &u));
        assert!(eval("total_spend == 1.0E+3", &u));
        assert!(eval("total_spend == 10000e-1", &u));
        assert!(eval("engagement_score == -2", &u));
        assert!(eval("engagement_score<-1", &u));
        assert!(eval("sessions.avg_duration_ms == 0.5", &u));
        assert!(eval("true", &u));
        assert!(!eval("false", &u));
        assert!(eval("(true)", &u));
        assert!(!eval("true && false", &u));
    }

    #[test]
    fn string_escapes() {
        for (text, category) in [
            (r#""say \"hi\"" in top_categories"#, "say \"hi\""),
            (r"'it\'s' in top_categories", "it's"),
            (r#"'a "b"' in top_categories"#, "a \"b\""),
            (r#""it's" in top_categories"#, "it's"),
            (r#""back\\slash" in top_categories"#, "back\\slash"),
            (r#""tab\there" in top_categories"#, "tab\there"),
            (r#""" in top_categories"#, ""),
            ("\"chaussures d'été\" in top_categories", "chaussures d'été"),
        ] {
            let mut seen = Vec::new();
            let r = Rule::compile(text, WINDOWS, &mut |s: &str| {
                seen.push(s.to_owned());
                fnv(s)
            })
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(seen, [category], "{text}");
            assert!(r.eval(&User::default().category(category)), "{text}");
        }
        assert_err(r#""a\qb" in top_categories"#, 3, "unknown escape");
    }

    #[test]
    fn literal_on_the_left_mirrors_the_operator() {
        for (mirrored, plain) in [
            ("1 <= counts.x", "counts.x >= 1"),
            ("1 < counts.x", "counts.x > 1"),
            ("1 >= counts.x", "counts.x <= 1"),
            ("1 > counts.x", "counts.x < 1"),
            ("1 == counts.x", "counts.x == 1"),
            ("1 != counts.x", "counts.x != 1"),
            ("\"tablet\" == last_device", "last_device == \"tablet\""),
            ("\"tablet\" != last_device", "last_device != \"tablet\""),
        ] {
            assert_eq!(rule(mirrored).root, rule(plain).root, "{mirrored}");
            for n in [0.0, 1.0, 2.0] {
                let u = User::default().count("x", n).device(Device::Tablet);
                assert_eq!(eval(mirrored, &u), eval(plain, &u), "{mirrored} at {n}");
            }
        }
    }

    #[test]
    fn absent_count_is_zero() {
        let u = User::default().count("view", 4.0);
        assert!(eval("counts.refund == 0", &u));
        assert!(eval("windows.1h.refund == 0", &u));
        assert!(!eval("counts.refund >= 1", &u));
    }

    #[test]
    fn last_device_absent_equals_nothing() {
        let none = User::default();
        assert!(!eval("last_device == \"mobile\"", &none));
        assert!(eval("last_device != \"mobile\"", &none));
        let desktop = User::default().device(Device::Desktop);
        assert!(eval("last_device != 'mobile'", &desktop));
        assert!(!eval("last_device != 'desktop'", &desktop));
    }

    #[test]
    fn list_membership() {
        let u = User::default()
            .device(Device::Tablet)
            .device(Device::Other)
            .item("sku-1");
        assert!(eval("\"tablet\" in devices", &u));
        assert!(eval("'other' in devices", &u));
        assert!(!eval("\"mobile\" in devices", &u));
        assert!(eval("\"sku-1\" in recent_items", &u));
        assert!(!eval("\"sku-2\" in recent_items", &u));
        assert!(!eval("\"shoes\" in top_categories", &u));
    }

    #[test]
    fn needs_lists_what_rules_read() {
        let r = rule(
            "windows.7d.view >= 1 || windows.1h.view >= 1 && windows.7d.buy == 0 \
             || engagement_score > 1",
        );
        let mut windows = vec![(0, fnv("view")), (2, fnv("view")), (2, fnv("buy"))];
        windows.sort_unstable();
        assert_eq!(
            r.needs(),
            Needs {
                windows,
                engagement: true,
                ..Needs::default()
            }
        );
        let r = rule("'x' in top_categories && !('mobile' in devices) || counts.a > 0");
        assert_eq!(
            r.needs(),
            Needs {
                top_categories: true,
                devices: true,
                counts: vec![fnv("a")],
                ..Needs::default()
            }
        );
        let plain = "last_device == 'mobile' && 'i' in recent_items && sessions.count > 1";
        assert_eq!(rule(plain).needs(), Needs::default());
        assert_eq!(rule("true").needs(), Needs::default());
    }

    #[test]
    fn needs_merge_unions() {
        let mut a = rule("windows.7d.x > 1 && counts.y > 1").needs();
        a.merge(&rule("windows.1h.x > 1 || windows.7d.z > 1 || engagement_score > 0").needs());
        a.merge(&rule("'m' in top_categories").needs());
        let mut windows = vec![(0, fnv("x")), (2, fnv("x")), (2, fnv("z"))];
        windows.sort_unstable();
        assert_eq!(
            a,
            Needs {
                windows,
                engagement: true,
                top_categories: true,
                devices: false,
                counts: vec![fnv("y")],
            }
        );
    }

    #[test]
    fn hash_is_called_with_type_names() {
        let mut seen = Vec::new();
        Rule::compile(
            "counts.view > 1 && windows.24h.buy > 0 || 'i9' in recent_items",
            WINDOWS,
            &mut |s: &str| {
                seen.push(s.to_owned());
                7
            },
        )
        .expect("compiles");
        assert_eq!(seen, ["view", "buy", "i9"]);
    }

    #[test]
    fn text_is_kept() {
        let text = "  counts.a >= 1\t";
        assert_eq!(rule(text).text(), text);
    }

    #[test]
    fn whitespace_is_optional_and_free() {
        let u = User::default().count("a", 2.0).device(Device::Mobile);
        assert!(eval("counts.a>=1&&last_device=='mobile'", &u));
        assert!(eval("\n( counts.a\t>= 1 )\r\n", &u));
        assert!(eval("!(counts.a<1)", &u));
    }

    #[test]
    fn error_display() {
        let e = err("foo == 1");
        assert_eq!(e.to_string(), format!("column 1: {}", e.message));
    }

    #[test]
    fn error_unknown_field() {
        assert_err("foo.bar >= 1", 1, "unknown field `foo.bar`");
        assert_err("foo.bar >= 1", 1, "windows.<label>.<type>");
        assert_err(
            "engagement_score > 50 || sessions.cnt < 2",
            26,
            "sessions.cnt",
        );
        assert_err("1 < counts", 5, "unknown field `counts`");
        assert_err("counts.a.b > 1", 1, "unknown field");
        assert_err("windows.24h > 1", 1, "unknown field");
        assert_err("counts. > 1", 8, "expected a name after `.`");
    }

    #[test]
    fn error_unknown_window() {
        let e = err("windows.2h.view >= 1");
        assert_eq!(e.column, 9);
        assert!(e.message.contains("`2h`"), "{e}");
        assert!(e.message.contains("1h, 24h, 7d"), "{e}");
        let e = Rule::compile("windows.1h.view > 0", &[], &mut fnv).expect_err("no windows");
        assert!(e.message.contains("no windows are configured"), "{e}");
    }

    #[test]
    fn error_invalid_type_name() {
        assert_err("counts.View > 1", 8, "invalid event type `View`");
        assert_err("counts.1x > 1", 8, "^[a-z][a-z0-9_]{0,63}$");
        assert_err("windows.24h._x > 1", 13, "invalid event type");
        let long = format!("counts.{} > 1", "a".repeat(65));
        assert_err(&long, 8, "invalid event type");
        rule(&format!("counts.{} > 1", "a".repeat(64)));
    }

    #[test]
    fn error_bad_device() {
        assert_err(
            "last_device == \"phone\"",
            16,
            "desktop, mobile, tablet, other",
        );
        assert_err("'Mobile' in devices", 1, "unknown device `Mobile`");
        assert_err("\"\" in recent_items", 1, "must not be empty");
    }

    #[test]
    fn error_type_mismatch() {
        assert_err("last_device >= 3", 13, "`==` or `!=`");
        assert_err("last_device == 3", 16, "not a number");
        assert_err("counts.purchase == \"x\"", 20, "not a string");
        assert_err("counts.purchase == true", 20, "not a boolean");
        assert_err("3 in devices", 1, "string literal");
        assert_err("counts.a in devices", 1, "string literal");
        assert_err("\"x\" in counts.purchase", 8, "must be a list");
        assert_err("\"x\" in last_device", 8, "must be a list");
        assert_err("\"x\" in \"y\"", 8, "must be a list");
        assert_err("devices == \"mobile\"", 1, "`devices` is a list");
        assert_err("\"x\" == top_categories", 8, "is a list");
        assert_err("counts.a == counts.b", 13, "two fields");
        assert_err("1 == 1", 6, "two literals");
        assert_err("true == false", 9, "two literals");
    }

    #[test]
    fn error_bare_field_or_literal() {
        assert_err("counts.a", 1, "not a condition");
        assert_err("true && devices", 9, "not a condition");
        assert_err("!3", 2, "a number is not a condition");
        assert_err("'x' || true", 1, "a string is not a condition");
        assert_err("nope", 1, "unknown field");
    }

    #[test]
    fn error_unbalanced_parenthesis() {
        assert_err("(counts.a >= 1", 1, "never closed");
        assert_err("((counts.a >= 1)", 1, "never closed");
        assert_err("counts.a >= 1)", 14, "unmatched `)`");
        assert_err(
            "(counts.a >= 1 counts.b",
            16,
            "expected `)` to close the `(` at column 1",
        );
        assert_err("()", 2, "expected a condition, found `)`");
        assert_err("(counts.a) >= 1", 12, "parenthesized");
    }

    #[test]
    fn error_trailing_garbage() {
        assert_err("counts.a >= 1 1", 15, "found `1`");
        assert_err("true false", 6, "found `false`");
        assert_err("counts.a >= 1 &&", 17, "end of the rule");
        assert_err("counts.a >=", 12, "after `>=`");
    }

    #[test]
    fn error_empty_rule() {
        assert_err("", 1, "empty rule");
        assert_err("  \t\n", 1, "empty rule");
    }

    #[test]
    fn error_unterminated_string() {
        assert_err("last_device == \"mobile", 16, "unterminated string");
        assert_err("'x\\' in devices", 1, "unterminated string");
        assert_err("'x\\", 1, "unterminated string");
    }

    #[test]
    fn error_chained_comparison() {
        assert_err("a < b < c", 7, "do not chain");
        assert_err("1 < counts.a < 3", 14, "do not chain");
        assert_err("'x' in devices in top_categories", 16, "do not chain");
        assert_err("counts.a == 1 == true", 15, "do not chain");
    }

    #[test]
    fn error_lexical() {
        assert_err("counts.a = 1", 10, "use `==`");
        assert_err("true & false", 6, "`&&`");
        assert_err("true | false", 6, "`||`");
        assert_err("counts.a > - 1", 12, "digit after `-`");
        assert_err("counts.a > 1e", 12, "invalid number `1e`");
        assert_err("counts.a > 3abc", 12, "invalid number");
        assert_err("counts.a > 1.2.3", 12, "invalid number");
        assert_err("counts.a > 1e999", 12, "out of range");
        assert_err("_x > 1", 1, "unexpected character `_`");
        assert_err("counts.a > 1 ; true", 14, "unexpected character `;`");
    }

    #[test]
    fn error_columns_count_chars_not_bytes() {
        assert_err(
            "\"é\" in top_categories && foo >= 1",
            26,
            "unknown field `foo`",
        );
        assert_err(
            "'日本語' in top_categories || 'x' == counts.a",
            28,
            "not a string",
        );
        assert_err("counts.a >= 1 ∧ true", 15, "unexpected character `∧`");
        assert_err(
            "'🦀' in top_categories && last_device == 'crab'",
            41,
            "unknown device",
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}true{}", "(".repeat(10_000), ")".repeat(10_000));
        assert_err(&deep, MAX_DEPTH + 1, "nested deeper");
        let bangs = format!("{}true", "!".repeat(10_000));
        assert_err(&bangs, MAX_DEPTH + 1, "nested deeper");
        let ok = format!("{}true{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(eval(&ok, &User::default()));
    }

    #[test]
    fn long_chains_stay_flat() {
        let chain = format!("{}true", "false || ".repeat(50_000));
        assert!(eval(&chain, &User::default()));
        let chain = format!("{}false", "true && ".repeat(50_000));
        assert!(!eval(&chain, &User::default()));
    }

    /// Pseudo-random rules from the token alphabet, plus raw junk: compile must never panic,
    /// errors must point inside the rule (or one past it), and what compiles must evaluate.
    #[test]
    fn random_rules_never_panic() {
        const ALPHABET: &[&str] = &[
            "counts.a",
            "windows.24h.view",
            "windows.9h.x",
            "windows.",
            "counts.Q",
            "last_device",
            "devices",
            "top_categories",
            "recent_items",
            "engagement_score",
            "sessions.current.events",
            "foo",
            "(",
            ")",
            "!",
            "not",
            "&&",
            "||",
            "and",
            "or",
            "==",
            "!=",
            "<",
            "<=",
            ">",
            ">=",
            "=",
            "&",
            "|",
            "in",
            "1",
            "-2.5",
            "1e3",
            "1e",
            "-",
            ".",
            "\"mobile\"",
            "'x'",
            "\"",
            "'",
            "\\",
            "\"a\\\"b\"",
            "true",
            "false",
            " ",
            "é",
            "日",
            "\t",
            "_",
            "0.",
            "9999e9999",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |bound: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as usize) % bound
        };
        let users = [
            User::default(),
            User::default()
                .count("a", 3.0)
                .window("24h", "view", 1.0)
                .device(Device::Mobile)
                .category("x"),
        ];
        // A grammatical rule of up to `left` conditions, as tokens.
        fn sentence(next: &mut dyn FnMut(usize) -> usize, left: usize, out: &mut Vec<&str>) {
            const FIELDS: &[&str] = &["counts.a", "windows.24h.view", "engagement_score"];
            const OPS: &[&str] = &["==", "!=", "<", "<=", ">", ">="];
            const NUMBERS: &[&str] = &["1", "-2.5", "1e3", "0"];
            const LISTS: &[(&str, &str)] = &[
                ("\"mobile\"", "devices"),
                ("'x'", "top_categories"),
                ("'i1'", "recent_items"),
            ];
            match next(6) {
                0 => out.push(["true", "false"][next(2)]),
                1 => {
                    let (item, list) = LISTS[next(LISTS.len())];
                    out.extend([item, "in", list]);
                }
                2 if left > 1 => {
                    out.push(["!", "not"][next(2)]);
                    sentence(next, left - 1, out);
                }
                3 if left > 1 => {
                    out.push("(");
                    sentence(next, left - 1, out);
                    out.push(["||", "or", "&&", "and"][next(4)]);
                    sentence(next, left - 1, out);
                    out.push(")");
                }
                4 => out.extend(["last_device", ["==", "!="][next(2)], "'tablet'"]),
                _ => {
                    let (f, op, n) = (FIELDS[next(3)], OPS[next(6)], NUMBERS[next(4)]);
                    if next(2) == 0 {
                        out.extend([f, op, n]);
                    } else {
                        out.extend([n, op, f]);
                    }
                }
            }
        }
        let mut compiled = 0;
        for round in 0..600 {
            let mut tokens = Vec::new();
            if round % 3 == 0 {
                // Pure junk from the alphabet.
                for _ in 0..1 + next(12) {
                    tokens.push(ALPHABET[next(ALPHABET.len())]);
                }
            } else {
                // A valid rule, then on every other round one token replaced or dropped.
                sentence(&mut next, 4, &mut tokens);
                if round % 2 == 0 {
                    let at = next(tokens.len());
                    if next(2) == 0 {
                        tokens[at] = ALPHABET[next(ALPHABET.len())];
                    } else {
                        tokens.remove(at);
                    }
                }
            }
            let mut text = String::new();
            for t in tokens {
                text.push_str(t);
                if next(3) > 0 {
                    text.push(' ');
                }
            }
            if round % 5 == 1 {
                // Raw characters, to reach lexer corners the token alphabet misses.
                text = (0..1 + next(16))
                    .map(|_| {
                        let raw = b"()!&|=<>\"'\\.-_ 0123aZe\t";
                        char::from(raw[next(raw.len())])
                    })
                    .collect();
            }
            match compile(&text) {
                Ok(r) => {
                    compiled += 1;
                    for u in &users {
                        r.eval(u);
                    }
                    r.needs();
                }
                Err(e) => {
                    let chars = text.chars().count();
                    assert!(
                        (1..=chars + 1).contains(&e.column),
                        "{text:?}: column {} outside 1..={}",
                        e.column,
                        chars + 1
                    );
                    assert!(!e.message.is_empty());
                }
            }
        }
        assert!(compiled > 100, "only {compiled} of 600 rules compiled");
    }
}
