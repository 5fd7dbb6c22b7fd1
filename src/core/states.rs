//! The names of key-version states and key privileges, as the catalog
//! stores them (text) and as errors print them.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Active,
    DecryptOnly,
    Disabled,
    Destroyed,
}

impl State {
    pub fn parse(s: &str) -> State {
        match s {
            "active" => State::Active,
            "decrypt_only" => State::DecryptOnly,
            "disabled" => State::Disabled,
            _ => State::Destroyed,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Active => "active",
            State::DecryptOnly => "decrypt_only",
            State::Disabled => "disabled",
            State::Destroyed => "destroyed",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Privilege {
    Encrypt,
    Decrypt,
}

impl Privilege {
    pub fn parse(s: &str) -> Option<Privilege> {
        match s {
            "encrypt" => Some(Privilege::Encrypt),
            "decrypt" => Some(Privilege::Decrypt),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Privilege::Encrypt => "encrypt",
            Privilege::Decrypt => "decrypt",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Privilege {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            State::Active,
            State::DecryptOnly,
            State::Disabled,
            State::Destroyed,
        ] {
            assert_eq!(State::parse(s.as_str()), s);
        }
        for p in [Privilege::Encrypt, Privilege::Decrypt] {
            assert_eq!(Privilege::parse(&p.to_string()), Some(p));
        }
        assert_eq!(Privilege::parse("admin"), None);
    }
}
