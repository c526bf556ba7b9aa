#!/bin/bash
# create_tokens.sh -- print the parameters of the fractals example, one token per line.
#
# Usage:  ./create_tokens.sh [SIZE] > fractals.txt
#         python ../../picas.py push fractals.txt
#
# Every line is one token's input: the options for bin/fractals, over a grid
# of quality (samples per pixel), zoom depth and maximum iterations, for
# square images of SIZE pixels (default 2048). At the default size a token
# takes from a few seconds to about a quarter of an hour on one core; a small SIZE
# (./create_tokens.sh 64) gives a quick test run of the same 24 tokens.
set -eu

size=${1:-2048}
case $size in
    ''|*[!0-9]*) echo "usage: $0 [SIZE]   (SIZE: image width in pixels)" >&2; exit 2 ;;
esac

for quality in 1 2 4; do
    for depth in 8 16 24 32; do
        for maxiter in 2000 8000; do
            echo "-s $size -q $quality -d $depth -m $maxiter"
        done
    done
done
