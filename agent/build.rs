//! Builds the XDP program for the BPF target and puts it in OUT_DIR, where `datapath.rs`
//! embeds it. aya-build reruns this whenever anything under agent-ebpf/ changes, so the
//! binary can never carry a stale object.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
