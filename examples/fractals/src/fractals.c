/*
 * fractals.c -- render a Mandelbrot or Julia set into a PPM/PGM image.
 *
 * The work unit of the PiCaS fractals example: every token holds one set of
 * parameters, and the time a token takes grows with the image size, the
 * quality (samples per pixel) and the maximum number of iterations, so a grid
 * of parameters gives tasks from a fraction of a second to many minutes.
 *
 * Build:   cc -O2 -Wall -o bin/fractals src/fractals.c -lm
 * Run:     bin/fractals -s 1024 -q 2 -d 12 -m 4000 -o picture.ppm
 *
 * Options:
 *   -s SIZE      width and height of the image in pixels (default 512)
 *   -q QUALITY   samples per pixel along each axis, 1..16 (default 1); the
 *                work grows with QUALITY squared and the edges get smoother
 *   -d DEPTH     zoom depth: the view is 2^DEPTH times narrower than the
 *                whole set, 0..46 (default 0); fractional values are fine
 *   -m MAXITER   maximum iterations per sample (default 1000); deep zooms
 *                need more to show detail
 *   -x RE -y IM  centre of the view (default: a point in the Mandelbrot
 *                set's "seahorse valley", which stays detailed when zoomed)
 *   -j RE,IM     draw the Julia set of c = RE + IM i instead (centre 0,0)
 *   -o FILE      output file (default fractal.ppm): a name ending in .pgm
 *                gets a greyscale PGM (P5), any other a colour PPM (P6);
 *                "-" writes the image to standard output
 *   -h           show this help
 *
 * The image is written to FILE.part and renamed to FILE when it is complete,
 * so a file with the final name is never a half-written one. Exit status: 0
 * image written, 1 an error writing it, 2 bad usage.
 *
 * Standard C99 plus POSIX getopt; no other dependencies.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TWO_PI 6.28318530717958647692
#define BAILOUT 256.0            /* escape radius squared: large, for smooth colours */

/* Default centre: deep in the seahorse valley between the main cardioid and
 * the period-2 bulb, a classic target for zoom sequences. */
#define DEFAULT_RE (-0.743643887037151)
#define DEFAULT_IM (0.131825904205330)

struct params {
    long size;
    long quality;
    double depth;
    long maxiter;
    double centre_re, centre_im;
    int julia;
    double c_re, c_im;
    const char *output;
};

static const char *program = "fractals";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: %s [-s SIZE] [-q QUALITY] [-d DEPTH] [-m MAXITER] [-x RE] [-y IM]\n"
            "       [-j RE,IM] [-o FILE]\n"
            "  -s SIZE     image width and height in pixels (default 512)\n"
            "  -q QUALITY  samples per pixel along each axis, 1..16 (default 1)\n"
            "  -d DEPTH    zoom: the view is 2^DEPTH times narrower, 0..46 (default 0)\n"
            "  -m MAXITER  maximum iterations per sample (default 1000)\n"
            "  -x RE -y IM centre of the view (default: the seahorse valley)\n"
            "  -j RE,IM    draw the Julia set of c = RE + IM i instead\n"
            "  -o FILE     output, .pgm for greyscale, else PPM; - for stdout\n"
            "              (default fractal.ppm)\n",
            program);
}

static void die_usage(const char *message, const char *value)
{
    fprintf(stderr, "%s: %s: '%s'\n", program, message, value);
    usage(stderr);
    exit(2);
}

static double parse_double(const char *text, double low, double high, const char *what)
{
    char *end;
    double value;

    errno = 0;
    value = strtod(text, &end);
    if (end == text || *end != '\0' || errno != 0 || !(value >= low && value <= high))
        die_usage(what, text);
    return value;
}

static long parse_long(const char *text, long low, long high, const char *what)
{
    char *end;
    long value;

    errno = 0;
    value = strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno != 0 || value < low || value > high)
        die_usage(what, text);
    return value;
}

static void parse_complex(const char *text, double *re, double *im)
{
    char *end;

    errno = 0;
    *re = strtod(text, &end);
    if (end == text || *end != ',' || errno != 0)
        die_usage("-j needs RE,IM", text);
    text = end + 1;
    *im = strtod(text, &end);
    if (end == text || *end != '\0' || errno != 0)
        die_usage("-j needs RE,IM", text);
    if (!(fabs(*re) <= 4.0 && fabs(*im) <= 4.0))
        die_usage("-j: c must lie within 4 of the origin", text);
}

/* Smooth ("normalised") iteration count of one point, or -1 when the point
 * did not escape within maxiter iterations (it is taken to be in the set). */
static double escape_time(double z_re, double z_im, double c_re, double c_im, long maxiter)
{
    long n;
    double re2 = z_re * z_re, im2 = z_im * z_im;

    for (n = 0; n < maxiter; n++) {
        if (re2 + im2 > BAILOUT) {
            /* log2(log|z|) corrects for how far past the radius z jumped. */
            double log_modulus = 0.5 * log(re2 + im2);
            return (double)n + 1.0 - log(log_modulus / log(2.0)) / log(2.0);
        }
        z_im = 2.0 * z_re * z_im + c_im;
        z_re = re2 - im2 + c_re;
        re2 = z_re * z_re;
        im2 = z_im * z_im;
    }
    return -1.0;
}

/* True for points in the main cardioid or the period-2 bulb of the
 * Mandelbrot set: they never escape, so skip iterating them. */
static int in_main_bulbs(double re, double im)
{
    double x = re - 0.25, q = x * x + im * im;

    if (q * (q + x) <= 0.25 * im * im)
        return 1;
    return (re + 1.0) * (re + 1.0) + im * im <= 0.0625;
}

/* Colour of one sample, each channel in 0..1: black inside the set, a
 * cyclic cosine palette outside. */
static void colour(double mu, double rgb[3])
{
    static const double phase[3] = {0.00, 0.10, 0.20};
    double t;
    int k;

    if (mu < 0.0) {
        rgb[0] = rgb[1] = rgb[2] = 0.0;
        return;
    }
    t = 0.35 * log(mu + 1.0);
    for (k = 0; k < 3; k++)
        rgb[k] = 0.5 + 0.5 * cos(TWO_PI * (t + phase[k]));
}

static unsigned char to_byte(double v)
{
    if (v <= 0.0)
        return 0;
    if (v >= 1.0)
        return 255;
    return (unsigned char)(v * 255.0 + 0.5);
}

static int ends_with(const char *text, const char *suffix)
{
    size_t n = strlen(text), m = strlen(suffix);
    return n >= m && strcmp(text + n - m, suffix) == 0;
}

/* Render the image row by row into out; returns 0 on success. */
static int render(const struct params *p, FILE *out, int grey)
{
    double width = (p->julia ? 3.2 : 3.0) / pow(2.0, p->depth);
    double step = width / (double)p->size;
    double sub = step / (double)p->quality;
    double left = p->centre_re - width / 2.0;
    double top = p->centre_im + width / 2.0;
    long channels = grey ? 1 : 3;
    long samples = p->quality * p->quality;
    unsigned char *row;
    long x, y, i, j;

    row = malloc((size_t)(p->size * channels));
    if (row == NULL) {
        fprintf(stderr, "%s: out of memory\n", program);
        return 1;
    }
    fprintf(out, "%s\n%ld %ld\n255\n", grey ? "P5" : "P6", p->size, p->size);
    for (y = 0; y < p->size; y++) {
        for (x = 0; x < p->size; x++) {
            double sum[3] = {0.0, 0.0, 0.0}, rgb[3];

            for (j = 0; j < p->quality; j++) {
                for (i = 0; i < p->quality; i++) {
                    double re = left + (double)x * step + ((double)i + 0.5) * sub;
                    double im = top - (double)y * step - ((double)j + 0.5) * sub;
                    double mu;

                    if (p->julia)
                        mu = escape_time(re, im, p->c_re, p->c_im, p->maxiter);
                    else if (in_main_bulbs(re, im))
                        mu = -1.0;
                    else
                        mu = escape_time(0.0, 0.0, re, im, p->maxiter);
                    colour(mu, rgb);
                    sum[0] += rgb[0];
                    sum[1] += rgb[1];
                    sum[2] += rgb[2];
                }
            }
            if (grey) {
                row[x] = to_byte((0.30 * sum[0] + 0.59 * sum[1] + 0.11 * sum[2]) / (double)samples);
            } else {
                row[3 * x] = to_byte(sum[0] / (double)samples);
                row[3 * x + 1] = to_byte(sum[1] / (double)samples);
                row[3 * x + 2] = to_byte(sum[2] / (double)samples);
            }
        }
        if (fwrite(row, 1, (size_t)(p->size * channels), out) != (size_t)(p->size * channels))
            break;
    }
    free(row);
    return ferror(out) ? 1 : 0;
}

int main(int argc, char **argv)
{
    struct params p;
    int opt, centre_given = 0, grey, status, to_stdout;
    FILE *out;
    char *part = NULL;
    clock_t started = clock();

    if (argc > 0 && argv[0] != NULL && argv[0][0] != '\0')
        program = argv[0];
    p.size = 512;
    p.quality = 1;
    p.depth = 0.0;
    p.maxiter = 1000;
    p.centre_re = DEFAULT_RE;
    p.centre_im = DEFAULT_IM;
    p.julia = 0;
    p.c_re = p.c_im = 0.0;
    p.output = "fractal.ppm";

    while ((opt = getopt(argc, argv, "s:q:d:m:x:y:j:o:h")) != -1) {
        switch (opt) {
        case 's': p.size = parse_long(optarg, 1, 65536, "-s: size must be 1..65536"); break;
        case 'q': p.quality = parse_long(optarg, 1, 16, "-q: quality must be 1..16"); break;
        case 'd': p.depth = parse_double(optarg, 0.0, 46.0, "-d: depth must be 0..46"); break;
        case 'm': p.maxiter = parse_long(optarg, 1, 1000000000L, "-m: bad iteration count"); break;
        case 'x': p.centre_re = parse_double(optarg, -4.0, 4.0, "-x: must be -4..4"); centre_given = 1; break;
        case 'y': p.centre_im = parse_double(optarg, -4.0, 4.0, "-y: must be -4..4"); centre_given = 1; break;
        case 'j': parse_complex(optarg, &p.c_re, &p.c_im); p.julia = 1; break;
        case 'o': p.output = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc)
        die_usage("unexpected argument", argv[optind]);
    if (p.output[0] == '\0')
        die_usage("-o: empty file name", p.output);
    if (p.julia && !centre_given)
        p.centre_re = p.centre_im = 0.0;
    grey = ends_with(p.output, ".pgm");
    to_stdout = strcmp(p.output, "-") == 0;

    if (to_stdout) {
        out = stdout;
    } else {
        part = malloc(strlen(p.output) + 6);
        if (part == NULL) {
            fprintf(stderr, "%s: out of memory\n", program);
            return 1;
        }
        sprintf(part, "%s.part", p.output);
        out = fopen(part, "wb");
        if (out == NULL) {
            fprintf(stderr, "%s: cannot write %s: %s\n", program, part, strerror(errno));
            free(part);
            return 1;
        }
    }

    status = render(&p, out, grey);
    if (to_stdout) {
        if (fflush(stdout) != 0)
            status = 1;
    } else {
        if (fclose(out) != 0)
            status = 1;
        if (status == 0 && rename(part, p.output) != 0) {
            fprintf(stderr, "%s: cannot rename %s to %s: %s\n", program, part, p.output,
                    strerror(errno));
            status = 1;
        }
        if (status != 0)
            remove(part);
        free(part);
    }
    if (status != 0) {
        fprintf(stderr, "%s: writing %s failed\n", program, p.output);
        return 1;
    }
    fprintf(to_stdout ? stderr : stdout,
            "%s: wrote %s: %s set, %ldx%ld pixels, quality %ld, depth %g, "
            "max %ld iterations, %.1f s CPU\n",
            program, p.output, p.julia ? "Julia" : "Mandelbrot", p.size, p.size, p.quality,
            p.depth, p.maxiter, (double)(clock() - started) / CLOCKS_PER_SEC);
    return 0;
}
