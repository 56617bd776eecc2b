#!/usr/bin/env bash
# Every benchmark in docs/results.md of the shipped embedded model, on the CPU, in two queues (one per core, one thread each);
# bench.token_probe's figures came from an earlier export (`--model DIR`) and are not rerun here.
#
#   bash bench/cpu.sh [OUTPUT_DIR]        # default: bench/results/cpu
#
# Each benchmark writes its output to OUTPUT_DIR/<name>.txt, so a run cut short keeps what finished. The two
# queues hold about the same CPU time (roughly an hour each on the 2-core machines); timing benchmarks
# (compose speed/loaded/capture) run last in queue A, after queue B has finished, on a quiet machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/cpu}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1
py=.venv/bin/python

run() {  # run NAME ARGS...: one benchmark, its tables to OUTPUT_DIR/NAME.txt, its progress and errors to NAME.err
    local name=$1
    shift
    echo "$(date +%T) start $name"
    if "$py" -m "$@" > "$out/$name.txt" 2> "$out/$name.err"; then
        rm -f "$out/$name.err"
    else
        echo "$(date +%T) FAILED $name (see $out/$name.err)"
    fi
}

queue_a() {
    run prompt_following bench.prompt_following --n 150 --pairs 100
    run adapters bench.adapters --n 50
    run two_subjects bench.two_subjects --n 60
    run perp_neg_texture bench.perp_neg --case texture
    run perp_neg_color bench.perp_neg --case color
    run perp_neg_full bench.perp_neg --case full
    run disentangle_b4m bench.disentangle b4m --make_steps 600 --b4m_targets attention+resnet --recipe wide --style_lr 3e-3 --make_lr 3e-4 --prior_layers all
    run clip_vs_accuracy bench.clip_vs_accuracy --n 200
}

queue_b() {
    run codec bench.codec
    run compose_quality bench.compose quality --seeds 100
    run disentangle_leakage bench.disentangle leakage
    run disentangle_leakage_wide bench.disentangle leakage --recipe wide --no-prior --lora_steps 600
    run efficient_zigzag bench.efficient --n 50 --sara_lr 4e-3 --colora_score weight_change
    run efficient_waves bench.efficient --n 50 --texture waves --trigger qwe --sara_lr 4e-3 --colora_score weight_change
}

# The fidelity tables on the previous base (build step 24,000, unguided): `studio build-tiny --base-only --output DIR`
# builds it; PREVIOUS_BASE names the folder.
previous="${PREVIOUS_BASE:-$HOME/.cache/adapter-studio/models/tiny-sd-24000}"

queue_fidelity() {  # docs/results.md, "Method fidelity", and the guided base's DECOR and composition reruns
    local b4m="bench.disentangle b4m --model $previous --make_steps 600 --b4m_targets attention+resnet --recipe wide
        --style_lr 3e-3 --make_lr 3e-4 --prior_layers all"
    local efficient="bench.efficient --model $previous --n 100 --sara_lr 4e-3"
    run fidelity_decor_basis bench.disentangle decor_basis --model "$previous"
    run fidelity_decor_seed0 bench.disentangle leakage --model "$previous" --recipe wide --no-prior --lora_steps 600
    for seed in 1 2 3; do
        run disentangle_leakage_wide_seed$seed bench.disentangle leakage --recipe wide --no-prior --lora_steps 600 \
            --seed $seed
    done
    run disentangle_leakage_wide_named bench.disentangle leakage --recipe wide --no-prior --lora_steps 600 \
        --caption named
    run fidelity_b4m_basis bench.disentangle basis --model "$previous" --n 50
    run fidelity_b4m_seed0 $b4m --seed 0
    for seed in 1 2 3; do run fidelity_b4m_seed$seed $b4m --no-plain --seed $seed; done
    for seed in 0 1 2 3; do run fidelity_b4m_prior_rows_d_seed$seed $b4m --prior_rows 0 --no-plain --seed $seed; done
    run fidelity_b4m_prior_rows_128_seed0 $b4m --prior_rows 128 --no-plain --seed 0
    run fidelity_b4m_make1000_seed0 $b4m --make_steps 1000 --no-plain --seed 0
    for seed in 0 1 2 3; do run fidelity_b4m_rank64_seed$seed $b4m --rank 64 --no-plain --seed $seed; done
    run compose_quality_decorrelated bench.compose quality --style decorrelated --n_values 2 3 --seeds 100 \
        --methods merge switch composite cmlora "cmlora, no cache" clora
    run compose_quality_b4m bench.compose quality --style b4m --n_values 2 --seeds 100
    # the Switch rows alone, at the paper's frequency: the docs' Switch rows cite these files
    run compose_quality_switch bench.compose quality --methods switch --seeds 100
    run compose_quality_decorrelated_switch bench.compose quality --style decorrelated --methods switch --seeds 100
    run compose_quality_b4m_switch bench.compose quality --style b4m --n_values 2 --methods switch --seeds 100
    run two_subjects_switch bench.two_subjects --n 60 --methods switch
    for seed in 0 1; do
        run fidelity_colora_faig_seed$seed $efficient --methods colora --colora_score faig --seed $seed
        run fidelity_colora_weight_change_seed$seed $efficient --methods colora --colora_score weight_change \
            --seed $seed
        run fidelity_lora_seed$seed $efficient --methods lora --seed $seed
        run fidelity_sara_default_seed$seed $efficient --methods sara --seed $seed
        run fidelity_sara_rank0_seed$seed $efficient --methods sara --sara_lambda_rank 0 --seed $seed
        run fidelity_sara_rank5e-4_all_seed$seed $efficient --methods sara --sara_lambda_rank 5e-4 \
            --sara_rank_layers all --seed $seed
    done
    run fidelity_sara_rank5e-3_all_seed0 $efficient --methods sara --sara_lambda_rank 5e-3 --sara_rank_layers all
}

queue_a &
queue_b
wait
queue_fidelity
run compose_speed bench.compose speed --repeats 3
run compose_loaded bench.compose loaded --repeats 5
run train_memory_tiny bench.train_memory --arch tiny
run compose_capture bench.compose capture --repeats 10
run img2img bench.img2img --steps 20 --strength 0.5 --repeats 5
grep -h "^|\|^n =\|two objects\|UNet\|loaded" "$out"/*.txt
