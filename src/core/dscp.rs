//! DSCP values, checked to 0..=63 and turned into the IP TOS byte in one place.

/// A DiffServ code point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dscp(u8);

impl Dscp {
    /// Class selector 6: control, commands, probes and tunnel main streams.
    pub const CS6: Dscp = Dscp(48);
    /// Class selector 4.
    pub const CS4: Dscp = Dscp(32);
    /// Class selector 2.
    pub const CS2: Dscp = Dscp(16);
    /// Class selector 0: best effort.
    pub const CS0: Dscp = Dscp(0);

    /// A DSCP value, if it fits in 6 bits.
    pub fn new(value: u8) -> Option<Dscp> {
        (value <= 63).then_some(Dscp(value))
    }

    /// The IP TOS byte (DSCP in the top six bits, ECN bits clear).
    pub fn tos(self) -> u32 {
        u32::from(self.0) << 2
    }

    /// The IP precedence (top three bits), by which many switches queue.
    pub fn precedence(self) -> u8 {
        self.0 >> 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_classes_fall_in_distinct_precedence_bands() {
        let bands: Vec<u8> = [Dscp::CS6, Dscp::CS4, Dscp::CS2, Dscp::CS0]
            .iter()
            .map(|d| d.precedence())
            .collect();
        assert_eq!(bands, [6, 4, 2, 0]);
        assert_eq!(Dscp::CS6.tos(), 0xc0);
        assert_eq!(Dscp::new(64), None);
    }
}
