//! Errors of the firewall compiler and its backends.

/// Why a ruleset could not be applied or read.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// `nft` is not installed or could not be started.
    #[error("cannot run nft: {0} (install the nftables package)")]
    NftMissing(std::io::Error),
    /// `nft` is older than what the generated rules need.
    #[error("nft {found} is too old: vmedge needs nftables {needed} or newer (interval concatenations, vmaps by ifname)")]
    NftTooOld {
        /// The version `nft --version` printed.
        found: String,
        /// The oldest version that works.
        needed: String,
    },
    /// `nft` refused the transaction; nothing was changed.
    #[error("nft refused the ruleset (nothing was changed): {message}{}", .line.as_ref().map(|(n, text)| format!("\n  generated line {n}: {text}")).unwrap_or_default())]
    Refused {
        /// What nft said, first error first.
        message: String,
        /// The line of generated text nft pointed at, and its number.
        line: Option<(usize, String)>,
    },
    /// `nft` printed something that is not the JSON it should be.
    #[error("cannot read nft's listing: {0}")]
    Listing(String),
    /// Running nft failed for another reason.
    #[error("nft failed: {0}")]
    Io(std::io::Error),
}
