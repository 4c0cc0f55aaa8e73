#!/bin/sh
# Remove the files matched by each glob argument, keeping copyright files and
# locale.alias. Prints each removed path (none: nothing changed).
set -eu
for pattern in "$@"; do
    base=${pattern%/\*}
    [ -d "$base" ] || continue
    find "$base" -mindepth 1 \( -type f -o -type l \) \
        ! -name copyright ! -name locale.alias -print -delete
    find "$base" -mindepth 1 -type d -empty -print -delete
done
