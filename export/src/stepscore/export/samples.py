"""Step chains the export gate scores with both the graph and the PyTorch reference.

Several candidates per problem share their first steps, so the packed run exercises shared prefixes
with branches as well as several sequences per row. The texts include the characters that trip
tokenizers (digits, LaTeX, unicode, blank lines) and a tag-looking string inside a step.
"""

from __future__ import annotations

SAMPLE_CHAINS: list[tuple[str, list[list[str]]]] = [
    (
        "Sue lives in a fun neighborhood. One weekend, the neighbors decided to play a prank on Sue. On Friday "
        "morning, the neighbors placed 18 pink plastic flamingos out on Sue's front yard. On Saturday morning, "
        "the neighbors took back one third of the flamingos, painted them white, and put these newly painted "
        "white flamingos back out on Sue's front yard. Then, on Sunday morning, they placed another 18 pink "
        "plastic flamingos out on the yard. At noon on Sunday, how many more pink plastic flamingos were out "
        "than white plastic flamingos?",
        [
            [
                "To find out how many more pink plastic flamingos were out than white plastic flamingos at noon on "
                "Sunday, we can break down the problem into steps. First, on Friday, the neighbors start with 18 "
                "pink plastic flamingos.",
                "On Saturday, they take back one third of the flamingos. Since there were 18 flamingos, (1/3 \\times "
                "18 = 6) flamingos are taken back. So, they have (18 - 6 = 12) flamingos left in their possession. "
                "Then, they paint these 6 flamingos white and put them back out on Sue's front yard. Now, Sue has "
                "the original 12 pink flamingos plus the 6 new white ones. Thus, by the end of Saturday, Sue has "
                "(12 + 6 = 18) pink flamingos and 6 white flamingos.",
                "On Sunday, the neighbors add another 18 pink plastic flamingos to Sue's front yard. By the end of "
                "Sunday morning, Sue has (18 + 18 = 36) pink flamingos and still 6 white flamingos.",
                "To find the difference, subtract the number of white flamingos from the number of pink "
                "flamingos: (36 - 6 = 30). Therefore, at noon on Sunday, there were 30 more pink plastic "
                "flamingos out than white plastic flamingos. The answer is (\\boxed{30}).",
            ],
            [
                "To find out how many more pink plastic flamingos were out than white plastic flamingos at noon on "
                "Sunday, we can break down the problem into steps. First, on Friday, the neighbors start with 18 "
                "pink plastic flamingos.",
                "On Saturday they take back 18 / 3 = 6 flamingos, paint them white and return them: 12 pink, 6 white.",
                "On Sunday 18 more pink ones arrive: 12 + 18 = 30 pink, 6 white, so 30 - 6 = 24. The answer is 24.",
            ],
        ],
    ),
    (
        "Compute $\\sum_{k=1}^{4} k^2$.",
        [
            ["We add the squares: $1 + 4 = 5$.", "Then $5 + 9 = 14$.", "Finally $14 + 16 = 30$, so the sum is 30."],
            ["We add the squares: $1 + 4 = 5$.", "Then $5 + 9 = 15$.", "Finally $15 + 16 = 31$."],
            ["Use $n(n+1)(2n+1)/6$ with $n = 4$:\n\n$4 \\cdot 5 \\cdot 9 / 6 = 30$.", "So the answer is 30 ✓."],
        ],
    ),
    (
        "Une voiture roule à 60 km/h pendant 2 h 30. Quelle distance parcourt-elle ?",
        [
            ["2 h 30 = 2,5 h.", "60 × 2,5 = 150, donc 150 km. <extra_0> ки"],
        ],
    ),
]
