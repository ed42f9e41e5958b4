#!/usr/bin/env bash
# One session of the GPU throughput benchmarks on a lent machine (one NVIDIA H200, Python 3.12 at `python3`
# with torch and herd's other core dependencies, no network): video adapter at the paper's sizes (64 and
# 16 frames × 4 tiles of 336 px, ViT-H/14 + Llama 3.2 1B + the 8B resampler), decord vs PyAV decoding and
# decord's memory over many reads, BEST-RQ pretraining of the 1B Conformer (eager, then torch.compile'd).
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh              # on the GPU machine, from the repo root
#   DRY=1 OUT=/tmp/gpuout bash benchmarks/gpu_session.sh      # CPU dry run: same commands, tiny sizes
#
# Needs the wheels of what that machine lacks in .whl/ (git-ignored; PyAV and decord, cp312 manylinux):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2010_x86_64 -d .whl av==18.1.0 decord==0.6.0
# They are installed with --target into $SITE; herd itself is laid out as its editable install maps it
# (herd.text = text/, ... ) by symlinks under $HERDSITE: a plain `pip install .` would leave out herd.plans
# (no __init__.py, not in pyproject's package list) and configs/.
#
# Writes $OUT/log.txt (nvidia-smi, every command's output, a summary) and $OUT/<part>.json, one per part:
# video_model_f64, video_model_f16, speech, speech_sft, video_decode, video_rss, speech_compile (or a JSON saying why it
# has none). Parts run in that order (most wanted first), each under `timeout` and all within BUDGET seconds
# (default 400): a part is skipped when less time is left than it needs to be worth starting.
#
# Environment: OUT (required), DRY=1 (tiny CPU sizes, no wheel install unless INSTALL=1), PY (python to
# use; python3, or .venv/bin/python in a dry run when it exists), SITE, HERDSITE, BUDGET,
# PARTS (space-separated subset of the parts, default all), RSS_READS (decord RSS reads, default 100).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
DRY=${DRY:-0}
if [[ -z ${PY:-} ]]; then
    PY=python3
    [[ $DRY == 1 && -x .venv/bin/python ]] && PY=.venv/bin/python
fi
SITE=${SITE:-/tmp/site}
HERDSITE=${HERDSITE:-/tmp/herdsite}
BUDGET=${BUDGET:-400}
PARTS=${PARTS:-video_model_f64 video_model_f16 speech speech_sft video_decode video_rss speech_compile}
RSS_READS=${RSS_READS:-100}
DEADLINE=$((SECONDS + BUDGET))
mkdir -p "$OUT"
LOG=$OUT/log.txt
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
log() { echo "[gpu_session $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

log "start: DRY=$DRY PY=$PY BUDGET=${BUDGET}s PARTS='$PARTS' git=$(git rev-parse --short HEAD 2>/dev/null) dirty=$(git status --porcelain 2>/dev/null | wc -l)"
if [[ $DRY != 1 ]]; then
    { nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv; } 2>&1 | tee -a "$LOG"
fi
{ echo "cpus $(nproc); C compiler (triton needs one for torch.compile): $(command -v cc gcc | head -1)"; free -g | head -2; } 2>&1 | tee -a "$LOG"

# --- install: the carried wheels into $SITE, herd as symlinks into $HERDSITE ----------------------------------
if [[ $DRY != 1 || ${INSTALL:-0} == 1 ]]; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    shopt -u nullglob
    log "install ${#wheels[@]} wheel(s) into $SITE: ${wheels[*]##*/}"
    if ((${#wheels[@]})); then
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${wheels[@]}" 2>&1 | tee -a "$LOG"; then
            log "pip failed: unzipping the wheels instead"
            "$PY" - "$SITE" "${wheels[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import sys, zipfile
for w in sys.argv[2:]:
    with zipfile.ZipFile(w) as z:
        z.extractall(sys.argv[1])
EOF
        fi
    fi
fi
rm -rf "$HERDSITE" && mkdir -p "$HERDSITE/herd"
for f in "$PWD"/herd/*; do
    [[ ${f##*/} == __pycache__ ]] || ln -s "$f" "$HERDSITE/herd/${f##*/}"
done
for m in text vision speech adapters data; do ln -s "$PWD/$m" "$HERDSITE/herd/$m"; done
export PYTHONPATH=$SITE:$HERDSITE${PYTHONPATH:+:$PYTHONPATH}
(cd /tmp && "$PY" - <<'EOF') 2>&1 | tee -a "$LOG"  # not from the repo root: ./herd would shadow the mapping
import sys, torch, herd, herd.plans.conformer, herd.vision.video, herd.adapters, herd.data.synthetic.videos
from herd.paths import CONFIG_DIR
assert (CONFIG_DIR / "speech/bestrq_tiny.toml").is_file(), CONFIG_DIR
import av, decord
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      f" ({torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}), herd from {herd.__file__},"
      f" configs {CONFIG_DIR}, av {av.__version__} ({av.__file__}), decord {decord.__version__}")
EOF
ok=$?
log "import check rc=$ok"
if ((ok != 0)); then
    echo '{"error": "import check failed: see log.txt"}' >"$OUT/import_error.json"
    exit 1
fi

# --- the parts -------------------------------------------------------------------------------------------------
# bench NAME TIMEOUT MIN CMD...: runs CMD under timeout (capped by what is left of BUDGET; skipped when under
# MIN seconds are left), its output into the log, and the last top-level JSON object it printed into
# $OUT/NAME.json (else a JSON with rc and the reason).
bench() {
    local name=$1 limit=$2 min=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    if ((left < min)); then
        log "SKIP $name: ${left}s left of the ${BUDGET}s budget"
        echo "{\"skipped\": \"budget: ${left}s left\"}" >"$OUT/$name.json"
        return
    fi
    ((limit > left)) && limit=$left
    log "RUN $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG" >"$WORK/$name.out"
    local rc=$?
    local took=$((SECONDS - t0))
    "$PY" - "$WORK/$name.out" "$OUT/$name.json" "$rc" "$took" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
src, dst, rc, took = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lines = open(src, errors="replace").read().splitlines()
result = None
for i in range(len(lines) - 1, -1, -1):  # the last line that is a bare "{" starts the printed result
    if lines[i] == "{":
        try:
            result, _ = json.JSONDecoder().raw_decode("\n".join(lines[i:]))
            break
        except ValueError:
            continue
if result is None:
    result = {"error": "timed out" if rc in (124, 137) else "no JSON result", "tail": lines[-25:]}
result["session"] = {"rc": rc, "wall_s": took}
json.dump(result, open(dst, "w"), indent=2)
print(f"saved {dst} (rc {rc}, {took}s)")
EOF
    log "END $name rc=$rc in ${took}s"
}

VIDEO=(benchmarks/video_adapter_throughput.py)
SPEECH=(benchmarks/speech_throughput.py)
if [[ $DRY == 1 ]]; then
    VMODEL=(--device cpu --dtype fp32 --tile 56 --tiles 2 --batch-size 2 --videos 2 --video-frames 64
        --video-size 160x96 --steps 1 --warmup 1 --skip decode rss)
    VFILES=(--device cpu --frames 16 --videos 2 --video-frames 48 --video-size 160x96 --repeats 1
        --rss-reads 20)
    SP=(--encoder tiny --codebooks 4 --codebook-size 256 --seconds 2 --batch-size 2 --steps 2 --warmup 1
        --dtype fp32 --device cpu)
    SFT=(--mode sft --encoder tiny --seconds 2 --batch-size 2 --steps 2 --warmup 1 --dtype fp32 --device cpu)
else
    # the paper's video stage: ViT-H/14 at 336 px, 4 tiles, the 8B resampler preset at the 1B LLM's width;
    # the model parts need real frames only (2 files), the decode/RSS parts the docstring's 640x360 × 300
    VMODEL=(--device cuda --dtype bf16 --tile 336 --tiles 4 --vision-preset vit_h14_336 --llm-preset llama3_2_1b
        --perceiver-preset llama3_8b --batch-size 2 --videos 2 --video-frames 128 --video-size 640x360
        --steps 3 --warmup 1 --skip decode rss)
    VFILES=(--device cuda --frames 64 --videos 4 --video-frames 300 --video-size 640x360 --repeats 3
        --rss-reads "$RSS_READS")
    SP=(--encoder speech_1b --seconds 60 --batch-size 8 --dtype bf16 --device cuda --steps 10 --warmup 3)
    # the paper's speech model: Llama 3 8B frozen + the 1B Conformer + the ~100M adapter, 30 s clips
    SFT=(--mode sft --encoder speech_1b --llm-preset llama3_8b --adapter-preset speech_adapter_8b --seconds 30
        --batch-size 4 --text-tokens 64 --dtype bf16 --device cuda --steps 5 --warmup 2)
fi

# part: timeout (s), the least time left it is worth starting with (s), command
for part in $PARTS; do
    case $part in
    video_model_f64) bench "$part" 150 60 "$PY" "${VIDEO[@]}" "${VMODEL[@]}" --frames 64 ;;
    video_model_f16) bench "$part" 120 45 "$PY" "${VIDEO[@]}" "${VMODEL[@]}" --frames 16 ;;
    speech) bench "$part" 150 60 "$PY" "${SPEECH[@]}" "${SP[@]}" --run-dir "$WORK/speech" ;;
    speech_sft) bench "$part" 150 60 "$PY" "${SPEECH[@]}" "${SFT[@]}" ;;
    video_decode) bench "$part" 100 45 "$PY" "${VIDEO[@]}" "${VFILES[@]}" --skip model rss ;;
    video_rss) bench "$part" 150 60 "$PY" "${VIDEO[@]}" "${VFILES[@]}" --videos 2 --skip model decode ;;
    speech_compile)
        bench "$part" 300 120 "$PY" "${SPEECH[@]}" "${SP[@]}" --run-dir "$WORK/speech_compile" \
            --set parallel.compile=true
        ;;
    *) log "unknown part $part" ;;
    esac
done

# --- summary ---------------------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    s = r.get("session")
    line = f"{f.stem:16s} " + (f"rc={s['rc']} {s['wall_s']}s" if s else "")
    if "model" in r:
        m = r["model"]
        line += (f"  clips/s {m['clips_per_s']}  step {m['step_s']} s  peak {m['peak_mem_gib']} GiB"
                 f"  pixels {m['pixel_values_shape']}")
    if "decode" in r:
        d = r["decode"]
        line += "  " + "  ".join(
            f"{b}: {d[b]['sampled']['frames_per_s']}/{d[b]['all_frames']['frames_per_s']} fps" for b in ("decord", "pyav") if b in d
        ) + f"  max_abs_diff {d.get('max_abs_diff')}"
    if "rss" in r:
        line += "  rss growth MiB " + " ".join(f"{k} {v['growth_mib']}" for k, v in r["rss"].items() if isinstance(v, dict))
    if "train_step_s" in r:
        line += (f"  step {r['train_step_s']:.3f} s  {r['train_utterance_seconds_per_s']:.0f} utt-s/s"
                 f"  peak {r['peak_mem_gib']} GiB  loss {r.get('final_loss')}")
    for k in ("error", "skipped"):
        if k in r:
            line += f"  {k}: {r[k]}"
    print(line)
EOF
log "done in ${SECONDS}s"
rm -rf "$WORK"
