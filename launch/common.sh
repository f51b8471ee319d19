# Shared by the launch scripts (sourced, not run): finds the repository and its Python.
#
# REPO_DIR   repository root (default: the directory above launch/, or SLURM_SUBMIT_DIR when the
#            script runs from SLURM's spool copy)
# PYTHON     interpreter (default: $REPO_DIR/.venv/bin/python if present, else python3)

find_repo_dir() {
    local candidate
    for candidate in "${REPO_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" \
                     "${SLURM_SUBMIT_DIR:-}"; do
        if [[ -n "$candidate" && -f "$candidate/megatron_ext/launch/plan.py" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    echo "launch: cannot find the repository (megatron_ext/launch/plan.py); set REPO_DIR" >&2
    return 1
}

REPO_DIR="$(find_repo_dir)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
        PYTHON="$REPO_DIR/.venv/bin/python"
    else
        PYTHON="python3"
    fi
fi
# Workers started by torchrun inherit this, so `-m megatron_ext.train` resolves from any cwd.
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
