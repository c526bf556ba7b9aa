#!/bin/bash
# process_fractal.sh -- the task script of the fractals example.
#
#   $1  the token's input: options for bin/fractals, e.g. "-s 2048 -q 2 -d 16 -m 8000"
#   $2  the token's id
#
# Run it through the pilot, from this folder:
#
#   python ../../picas.py run -- ./process_fractal.sh
#
# It renders the image into $FRACTALS_OUTPUT_DIR (default: ./output) as
# <token id>.ppm and exits with bin/fractals' exit code, which picas.py
# stores in the token. On a grid worker node the output folder disappears
# with the job: copy the image to storage at the end (see the comment below).
#
# Unlike the quick example's process_task.sh, this script never runs the
# token's input as a command: it only accepts the options below with numeric
# values, so a token cannot make the pilot run anything but bin/fractals.

here=$(cd "$(dirname "$0")" && pwd)
fractals=$here/bin/fractals

if [ $# -lt 2 ]; then
    echo "usage: $0 'FRACTALS OPTIONS' TOKEN_ID" >&2
    exit 2
fi
if [ ! -x "$fractals" ]; then
    echo "$fractals is missing: build it with" >&2
    echo "  cd $here && mkdir -p bin && cc -O2 -o bin/fractals src/fractals.c -lm" >&2
    exit 2
fi

# Split the input into words (no globbing) and check every one of them.
set -f
read -r -a params <<< "$1"
set +f
expect=option
for word in "${params[@]}"; do
    if [ "$expect" = option ]; then
        case $word in
            -s|-q|-d|-m|-x|-y|-j) expect=value ;;
            *) echo "token input: unexpected option '$word' (allowed: -s -q -d -m -x -y -j)" >&2
               exit 2 ;;
        esac
    else
        if ! [[ $word =~ ^[-+]?[0-9.eE]+(,[-+]?[0-9.eE]+)?$ ]]; then
            echo "token input: '$word' is not a number" >&2
            exit 2
        fi
        expect=option
    fi
done
if [ "$expect" = value ]; then
    echo "token input: the last option has no value" >&2
    exit 2
fi

# The output is named after the token; characters that do not belong in a
# file name are replaced by '_'.
outdir=${FRACTALS_OUTPUT_DIR:-output}
mkdir -p "$outdir" || exit 1
name=$(printf '%s' "$2" | tr -c 'A-Za-z0-9._-' '_')
output=$outdir/$name.ppm

echo "token:   $2"
echo "host:    $(hostname)"
echo "started: $(date)"
echo "running: $fractals ${params[*]} -o $output"
"$fractals" "${params[@]}" -o "$output"
status=$?
echo "finished: $(date), exit code $status"

# On the grid, copy the result to storage here, for example:
#   [ $status -eq 0 ] && gfal-copy "file://$PWD/$output" "davs://storage.example.org/myproject/$name.ppm"
exit "$status"
