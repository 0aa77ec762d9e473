//! The verifier walks every path of a program and gives up at 1M instructions. A change
//! that multiplies its states (a value carried across branches, stores inlined at a hook's
//! end) can eat that budget at once; this fails with the numbers while there is headroom
//! left to find the cause, rather than when a load fails on a gateway's kernel.

mod common;

/// Half the verifier's limit (BPF_COMPLEXITY_LIMIT_INSNS): newer kernels may walk more.
const BUDGET: u32 = 500_000;

#[test]
fn each_program_leaves_the_verifier_headroom() {
    let datapath = common::load_datapath();
    let counts = datapath
        .verified_instructions()
        .expect("reading the programs' info");
    for (program, count) in &counts {
        println!("{program}: {count} instructions verified");
        assert!(
            (1..=BUDGET).contains(count),
            "{program}: the verifier walked {count} instructions (budget {BUDGET} of its 1M \
             limit; 0 means the kernel did not say)"
        );
    }
}
