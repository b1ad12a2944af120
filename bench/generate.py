"""Synthetic immigration medical exams: transaction Bundles in the shapes of the profiles in ``fhir/``.

Every exam is one migrant: a Patient with a passport and case numbers, names in
the original script and a Latin transliteration, an Encounter, vital signs,
TB screening (IGRA, chest X-ray with an ImagingStudy and a DiagnosticReport,
sputum smears, cultures and NAAT when the X-ray suggests TB), serology,
vaccinations, presumptive treatment, the classification, the signed consent
form and one Consent per receiving authority. 20 to 30 entries, seeded and
reproducible: ``exam(i, seed)`` is always the same exam.

``small_exam`` is the reduced shape used to load 100k exams quickly (Patient,
Encounter, IGRA, classification and the Consents).

    python -m bench.generate --count 1000 --out exams.ndjson
"""

from __future__ import annotations

import argparse
import random
import sys
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
CVX = "http://hl7.org/fhir/sid/cvx"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
MHR = "https://mhr.example.org/fhir"
OBS_CODE = f"{MHR}/CodeSystem/observation-code"
ORG_SID = f"{MHR}/sid/organization"
LANGUAGE_EXT = "http://hl7.org/fhir/StructureDefinition/language"
AUTHORITIES = ("authority-a", "authority-b")
NAMESPACE = uuid.UUID("6f1c5c52-8a7e-4c1e-9a55-3b1f0d6a2b10")

# (ISO3 of the passport, language, script names as (family, given...), Latin transliteration)
PEOPLE: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "SYR",
        "ar",
        [("الأحمد", "Al-Ahmad"), ("الحسن", "Al-Hassan"), ("خليل", "Khalil"), ("حداد", "Haddad")],
        "ar-Latn",
    ),
    (
        "AFG",
        "ps",
        [("احمدزی", "Ahmadzai"), ("کریمی", "Karimi"), ("رحیمی", "Rahimi"), ("نوری", "Noori")],
        "ps-Latn",
    ),
    (
        "ETH",
        "am",
        [("ገብሬ", "Gebre"), ("ተስፋዬ", "Tesfaye"), ("ከበደ", "Kebede"), ("ኃይሉ", "Hailu")],
        "am-Latn",
    ),
    (
        "ERI",
        "ti",
        [("ተኽለ", "Tekle"), ("ብርሃነ", "Berhane"), ("ገብረመድህን", "Gebremedhin"), ("ዮውሃንስ", "Yohannes")],
        "ti-Latn",
    ),
    (
        "UKR",
        "uk",
        [("Шевченко", "Shevchenko"), ("Коваленко", "Kovalenko"), ("Бондаренко", "Bondarenko")],
        "uk-Latn",
    ),
    ("NPL", "ne", [("श्रेष्ठ", "Shrestha"), ("गुरुङ", "Gurung"), ("तामाङ", "Tamang"), ("राई", "Rai")], "ne-Latn"),
    ("MMR", "my", [("အောင်", "Aung"), ("ထွန်း", "Tun"), ("ဝင်း", "Win"), ("ကျော်", "Kyaw")], "my-Latn"),
    ("CHN", "zh", [("王", "Wang"), ("李", "Li"), ("张", "Zhang"), ("刘", "Liu")], "zh-Latn"),
    ("IRN", "fa", [("رضایی", "Rezaei"), ("محمدی", "Mohammadi"), ("حسینی", "Hosseini")], "fa-Latn"),
    ("SOM", "so", [("Cabdi", "Abdi"), ("Maxamed", "Mohamed"), ("Xasan", "Hassan")], "so-Latn"),
    ("COL", "es", [("García", "Garcia"), ("Rodríguez", "Rodriguez"), ("Núñez", "Nunez")], "es-Latn"),
]
GIVEN: dict[str, list[tuple[str, str]]] = {
    "ar": [("محمد", "Mohammad"), ("فاطمة", "Fatima"), ("عمر", "Omar"), ("ليلى", "Layla"), ("يوسف", "Yusuf")],
    "ps": [("احمد", "Ahmad"), ("مریم", "Maryam"), ("ګل", "Gul"), ("زرمينه", "Zarmina")],
    "am": [("ሰላም", "Selam"), ("አበበ", "Abebe"), ("ትዕግስት", "Tigist"), ("ዳዊት", "Dawit")],
    "ti": [("ሳባ", "Saba"), ("ዳኒኤል", "Daniel"), ("ሄለን", "Helen"), ("ሚካኤል", "Mikael")],
    "uk": [("Олена", "Olena"), ("Андрій", "Andrii"), ("Ірина", "Iryna"), ("Тарас", "Taras")],  # noqa: RUF001
    "ne": [("सीता", "Sita"), ("राम", "Ram"), ("मीना", "Mina"), ("बिकास", "Bikas")],
    "my": [("မြ", "Mya"), ("သူ", "Thu"), ("နွယ်", "Nwe"), ("လင်း", "Lin")],
    "zh": [("伟", "Wei"), ("芳", "Fang"), ("静", "Jing"), ("磊", "Lei")],
    "fa": [("علی", "Ali"), ("زهرا", "Zahra"), ("رضا", "Reza"), ("نگار", "Negar")],
    "so": [("Xaliimo", "Halimo"), ("Cali", "Ali"), ("Faadumo", "Fadumo"), ("Axmed", "Ahmed")],
    "es": [("María", "Maria"), ("José", "Jose"), ("Lucía", "Lucia"), ("Andrés", "Andres")],
}
CLINICS = [
    ("iom-clinic-amman", "IOM Migration Health Assessment Centre, Amman"),
    ("iom-clinic-addis-ababa", "IOM Migration Health Assessment Centre, Addis Ababa"),
    ("iom-clinic-kathmandu", "IOM Migration Health Assessment Centre, Kathmandu"),
    ("iom-clinic-nairobi", "IOM Migration Health Assessment Centre, Nairobi"),
]
EXAM_TYPES = [("immigrant", "Immigrant visa applicant"), ("refugee", "Refugee")]
# (overall, TB class, weight): most exams are no-class; TB classes as a panel clinic sees them
CLASSES = [
    ("no-class", "No class", "none", "No TB classification", 60),
    ("class-b", "Class B condition", "B1-pulmonary", "Class B1 TB, pulmonary", 8),
    ("class-b", "Class B condition", "B1-extrapulmonary", "Class B1 TB, extrapulmonary", 2),
    ("class-b", "Class B condition", "B2", "Class B2 TB, LTBI evaluation", 15),
    ("class-b", "Class B condition", "B3", "Class B3 TB, contact evaluation", 5),
    ("class-b-other", "Class B other condition", "none", "No TB classification", 8),
    ("class-a", "Class A condition", "A", "Class A TB", 2),
]
VACCINES = [
    ("03", "MMR"),
    ("09", "Td (adult)"),
    ("10", "IPV"),
    ("08", "Hep B, adolescent or pediatric"),
    ("20", "DTaP"),
    ("141", "Influenza, seasonal, injectable"),
]
NEGATIVE = {"system": SNOMED, "code": "260385009", "display": "Negative"}
POSITIVE = {"system": SNOMED, "code": "10828004", "display": "Positive"}
NON_REACTIVE = {"system": SNOMED, "code": "131194007", "display": "Non-reactive"}
REACTIVE = {"system": SNOMED, "code": "11214006", "display": "Reactive"}
IGRA = {
    "neg": {"system": LOINC, "code": "LA6577-6", "display": "Negative"},
    "pos": {"system": LOINC, "code": "LA6576-8", "display": "Positive"},
    "ind": {"system": LOINC, "code": "LA11884-6", "display": "Indeterminate"},
}
CXR_TB = ["infiltrate-consolidation", "cavitary-lesion", "nodule-mass-poorly-defined", "pleural-effusion"]
CXR_MINOR = ["calcified-nodule-granuloma", "minor-apical-pleural-thickening", "discrete-linear-opacity"]


def _cc(coding: dict[str, str], text: str | None = None) -> dict[str, Any]:
    return {"coding": [coding], "text": text or coding.get("display", coding["code"])}


def _category(code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": OBS_CATEGORY, "code": code}]}]


class _Exam:
    """Builds one exam's entries; references are urn:uuid fullUrls within the Bundle."""

    def __init__(self, rng: random.Random, key: str, when: datetime) -> None:
        self.rng = rng
        self.key = key
        self.when = when
        self.entries: list[dict[str, Any]] = []
        self.counter = 0
        self.patient = self._urn()
        self.encounter = self._urn()

    def _urn(self) -> str:
        self.counter += 1
        return f"urn:uuid:{uuid.uuid5(NAMESPACE, f'{self.key}/{self.counter}')}"

    def at(self, days: float, hour: int = 9) -> str:
        moment = (self.when + timedelta(days=days)).replace(hour=hour, minute=self.rng.randrange(0, 60, 5))
        return moment.isoformat(timespec="seconds")

    def add(self, resource: dict[str, Any], url: str | None = None, **request: str) -> str:
        full_url = url or self._urn()
        self.entries.append(
            {
                "fullUrl": full_url,
                "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"], **request},
            }
        )
        return full_url

    def observation(self, category: str, code: dict[str, Any], when: str, **value: Any) -> str:
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final",
            "category": _category(category),
            "code": code,
            "subject": {"reference": self.patient},
            "encounter": {"reference": self.encounter},
            "effectiveDateTime": when,
            **value,
        }
        return self.add(resource)


def _quantity(value: float, unit: str, code: str | None = None) -> dict[str, Any]:
    return {"valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": code or unit}}


def _patient(rng: random.Random, index: int, exam_day: date) -> tuple[dict[str, Any], str, int]:
    country, lang, families, latin = PEOPLE[index % len(PEOPLE)]
    family, family_latin = rng.choice(families)
    given, given_latin = rng.sample(GIVEN[lang], 2)
    age = rng.choice([rng.randint(1, 14), rng.randint(15, 45), rng.randint(15, 45), rng.randint(46, 80)])
    birth = exam_day - timedelta(days=365 * age + rng.randint(0, 364))
    passport = f"{country[0]}{index:08d}"
    names = [
        {
            "extension": [{"url": LANGUAGE_EXT, "valueCode": lang}],
            "use": "official",
            "text": f"{given[0]} {given[1]} {family}" if lang not in ("zh",) else f"{family}{given[0]}",
            "family": family,
            "given": list(given),
        },
        {
            "extension": [{"url": LANGUAGE_EXT, "valueCode": latin}],
            "use": "usual",
            "text": f"{given_latin[0]} {given_latin[1]} {family_latin}",
            "family": family_latin,
            "given": list(given_latin),
        },
    ]
    if lang in ("es", "so"):
        names = names[:1]
        names[0]["use"] = "official"
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "official",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "PPN",
                            "display": "Passport number",
                        }
                    ],
                    "text": "Passport",
                },
                "system": f"http://hl7.org/fhir/sid/passport-{country}",
                "value": passport,
            },
            {"system": f"{MHR}/sid/case-number", "value": f"{country[:2]}{exam_day.year}-{index:07d}"},
            {"system": f"{MHR}/sid/iom-case-number", "value": f"{country}-{exam_day.year % 100}-{index:08d}"},
        ],
        "name": names,
        "gender": rng.choice(["male", "female"]),
        "birthDate": birth.isoformat(),
    }
    return patient, f"identifier=http://hl7.org/fhir/sid/passport-{country}|{passport}", age


def _consent(x: _Exam, authority: str, document: str | None, clinic: tuple[str, str]) -> dict[str, Any]:
    start = x.when.date()
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "status": "active",
        "scope": _cc(
            {
                "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                "code": "patient-privacy",
                "display": "Privacy Consent",
            }
        ),
        "category": [_cc({"system": LOINC, "code": "59284-0", "display": "Patient Consent"})],
        "patient": {"reference": x.patient},
        "dateTime": x.at(0, 8),
        "organization": [
            {
                "type": "Organization",
                "identifier": {"system": ORG_SID, "value": clinic[0]},
                "display": clinic[1],
            }
        ],
        "policy": [{"authority": "https://mhr.example.org", "uri": f"{MHR}/policy/voluntary-consent"}],
        "provision": {
            "type": "permit",
            "period": {"start": start.isoformat(), "end": (start + timedelta(days=3 * 365)).isoformat()},
            "actor": [
                {
                    "role": _cc(
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP",
                            "display": "information recipient",
                        }
                    ),
                    "reference": {
                        "type": "Organization",
                        "identifier": {"system": ORG_SID, "value": authority},
                        "display": f"Receiving health authority {authority[-1].upper()}",
                    },
                }
            ],
            "purpose": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                    "code": "PUBHLTH",
                    "display": "public health",
                }
            ],
        },
    }
    if document:
        resource["sourceReference"] = {"reference": document}
    return resource


def _start(index: int, seed: int, now: datetime) -> tuple[random.Random, _Exam, tuple[str, str], int]:
    rng = random.Random(f"{seed}/{index}")
    when = (now - timedelta(days=rng.randint(5, 400))).replace(second=0, microsecond=0)
    x = _Exam(rng, f"{seed}/{index}", when)
    clinic = CLINICS[index % len(CLINICS)]
    patient, if_none_exist, age = _patient(rng, index, when.date())
    x.add(patient, x.patient, ifNoneExist=if_none_exist)
    exam_type = rng.choice(EXAM_TYPES)
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
            "display": "ambulatory",
        },
        "type": [
            _cc({"system": f"{MHR}/CodeSystem/exam-type", "code": exam_type[0], "display": exam_type[1]})
        ],
        "subject": {"reference": x.patient},
        "period": {"start": x.at(0, 8), "end": x.at(rng.randint(3, 40), 16)},
        "serviceProvider": {
            "type": "Organization",
            "identifier": {"system": ORG_SID, "value": clinic[0]},
            "display": clinic[1],
        },
    }
    x.add(encounter, x.encounter)
    return rng, x, clinic, age


def _classification(x: _Exam, cls: tuple[str, str, str, str, int]) -> str:
    overall, overall_display, tb, tb_display, _ = cls
    return x.observation(
        "exam",
        _cc(
            {
                "system": OBS_CODE,
                "code": "exam-classification",
                "display": "Immigration medical exam classification",
            }
        ),
        x.at(3, 15),
        valueCodeableConcept=_cc(
            {
                "system": f"{MHR}/CodeSystem/overall-classification",
                "code": overall,
                "display": overall_display,
            }
        ),
        component=[
            {
                "code": _cc(
                    {"system": OBS_CODE, "code": "tb-classification", "display": "TB classification"}
                ),
                "valueCodeableConcept": _cc(
                    {"system": f"{MHR}/CodeSystem/tb-classification", "code": tb, "display": tb_display}
                ),
            }
        ],
    )


def _bundle(x: _Exam, index: int, seed: int) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": f"bench-exam-{seed}-{index}",
        "type": "transaction",
        "timestamp": x.at(3, 16),
        "entry": x.entries,
    }


def exam(index: int, seed: int = 1, now: datetime | None = None) -> dict[str, Any]:
    """The full exam number ``index``: 20 to 30 entries."""
    rng, x, clinic, age = _start(index, seed, now or datetime.now(UTC))
    cls = rng.choices(CLASSES, weights=[c[4] for c in CLASSES])[0]
    tb = cls[2]
    adult = age >= 15
    weight = round(rng.uniform(12, 35) if not adult else rng.uniform(45, 95), 1)
    height = rng.randint(85, 150) if not adult else rng.randint(150, 192)
    vitals = [
        ("29463-7", "Body weight", _quantity(weight, "kg")),
        ("8302-2", "Body height", _quantity(height, "cm")),
        ("39156-5", "Body mass index", _quantity(round(weight / (height / 100) ** 2, 1), "kg/m2")),
        ("8867-4", "Heart rate", _quantity(rng.randint(58, 110), "beats/minute", "/min")),
        ("9279-1", "Respiratory rate", _quantity(rng.randint(12, 24), "breaths/minute", "/min")),
        ("8310-5", "Body temperature", _quantity(round(rng.uniform(36.1, 37.6), 1), "Cel")),
        ("59408-5", "Oxygen saturation", _quantity(rng.randint(94, 100), "%")),
    ]
    for code, text, value in vitals:
        x.observation("vital-signs", _cc({"system": LOINC, "code": code}, text), x.at(0, 9), **value)
    systolic, diastolic = rng.randint(100, 150), rng.randint(60, 95)
    x.observation(
        "vital-signs",
        _cc({"system": LOINC, "code": "85354-9"}, "Blood pressure"),
        x.at(0, 9),
        component=[
            {
                "code": _cc({"system": LOINC, "code": "8480-6"}, "Systolic blood pressure"),
                **_quantity(systolic, "mmHg", "mm[Hg]"),
            },
            {
                "code": _cc({"system": LOINC, "code": "8462-4"}, "Diastolic blood pressure"),
                **_quantity(diastolic, "mmHg", "mm[Hg]"),
            },
        ],
    )
    igra = "pos" if tb in ("B1-pulmonary", "B2", "A") else rng.choice(["neg"] * 8 + ["ind"])
    x.observation(
        "laboratory",
        _cc({"system": LOINC, "code": "71773-6"}, "IGRA interpretation"),
        x.at(1, 13),
        valueCodeableConcept=_cc(IGRA[igra]),
    )
    results: list[str] = []
    imaging: str | None = None
    if adult or tb in ("B1-pulmonary", "A"):
        imaging = x.add(
            {
                "resourceType": "ImagingStudy",
                "status": "available",
                "subject": {"reference": x.patient},
                "encounter": {"reference": x.encounter},
                "started": x.at(0, 10),
                "numberOfSeries": 1,
                "numberOfInstances": 2,
                "series": [
                    {
                        "uid": f"2.25.{uuid.uuid5(NAMESPACE, x.key).int}",
                        "number": 1,
                        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"},
                        "numberOfInstances": 2,
                        "description": "Chest PA and lateral",
                    }
                ],
            }
        )
        findings = (
            rng.sample(CXR_TB, 2)
            if tb in ("B1-pulmonary", "A")
            else (["normal"] if rng.random() < 0.8 else [rng.choice(CXR_MINOR)])
        )
        results.append(
            x.observation(
                "imaging",
                _cc({"system": LOINC, "code": "36643-5"}, "Chest X-ray"),
                x.at(0, 10),
                component=[
                    {
                        "code": _cc(
                            {"system": OBS_CODE, "code": "cxr-finding", "display": "Chest X-ray finding"}
                        ),
                        "valueCodeableConcept": _cc(
                            {"system": f"{MHR}/CodeSystem/cxr-finding", "code": f},
                            f.replace("-", " ").capitalize(),
                        ),
                    }
                    for f in findings
                ],
            )
        )
    if tb in ("B1-pulmonary", "A"):
        for n in range(1, 4):
            specimen = {"display": f"Sputum specimen {n} of 3"}
            smear = POSITIVE if tb == "A" and n == 1 else NEGATIVE
            results.append(
                x.observation(
                    "laboratory",
                    _cc({"system": LOINC, "code": "11477-7"}, "AFB smear, sputum"),
                    x.at(1 + n, 7),
                    valueCodeableConcept=_cc(smear),
                    specimen=specimen,
                )
            )
            results.append(
                x.observation(
                    "laboratory",
                    _cc({"system": LOINC, "code": "543-9"}, "Mycobacterial culture, sputum"),
                    x.at(1 + n, 7),
                    valueCodeableConcept=_cc(POSITIVE if tb == "A" else NEGATIVE),
                    specimen=specimen,
                    note=[
                        {
                            "text": "No growth after 8 weeks."
                            if tb != "A"
                            else "M. tuberculosis complex grown."
                        }
                    ],
                )
            )
        x.observation(
            "laboratory",
            _cc({"system": LOINC, "code": "38379-4"}, "MTBC NAAT"),
            x.at(2, 7),
            valueCodeableConcept=_cc(POSITIVE if tb == "A" else NEGATIVE),
            specimen={"display": "Sputum specimen 1 of 3"},
        )
    serology = [("20507-0", "RPR"), ("5196-1", "Hepatitis B surface antigen")]
    if adult:
        serology.append(("24110-9", "Treponema pallidum Ab"))
    for code, text in serology:
        reactive = rng.random() < 0.03
        x.observation(
            "laboratory",
            _cc({"system": LOINC, "code": code}, text),
            x.at(1, 13),
            valueCodeableConcept=_cc(REACTIVE if reactive else NON_REACTIVE),
        )
    # What follows the vaccinations: treatment (refugees), classification, report, form, Consents.
    tail = int(exam_type_is_refugee(x)) + 1 + int(imaging is not None) + 1 + len(AUTHORITIES)
    shots = min(max(rng.randint(1, 3), 20 - len(x.entries) - tail), 30 - len(x.entries) - tail)
    for code, display in rng.sample(VACCINES, shots):
        x.add(
            {
                "resourceType": "Immunization",
                "status": "completed",
                "vaccineCode": _cc({"system": CVX, "code": code, "display": display}),
                "patient": {"reference": x.patient},
                "encounter": {"reference": x.encounter},
                "occurrenceDateTime": x.at(1, 11),
                "primarySource": True,
                "lotNumber": f"{code}-{rng.randint(1000, 9999)}",
                "performer": [
                    {
                        "actor": {
                            "type": "Organization",
                            "identifier": {"system": ORG_SID, "value": clinic[0]},
                            "display": clinic[1],
                        }
                    }
                ],
            }
        )
    if exam_type_is_refugee(x):
        x.add(
            {
                "resourceType": "MedicationAdministration",
                "status": "completed",
                "medicationCodeableConcept": _cc(
                    {
                        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                        "code": "199672",
                        "display": "albendazole 200 MG Oral Tablet",
                    },
                    "Albendazole 400 mg",
                ),
                "subject": {"reference": x.patient},
                "context": {"reference": x.encounter},
                "effectiveDateTime": x.at(1, 12),
                "reasonCode": [
                    {"text": "Presumptive treatment for soil-transmitted helminths before departure"}
                ],
                "dosage": {
                    "text": "400 mg by mouth, single dose",
                    "dose": {"value": 400, "unit": "mg", "system": UCUM, "code": "mg"},
                },
            }
        )
    _classification(x, cls)
    if imaging is not None:
        x.add(
            {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "category": [
                    _cc(
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                            "code": "RAD",
                            "display": "Radiology",
                        }
                    )
                ],
                "code": _cc({"system": LOINC, "code": "36643-5"}, "Chest X-ray"),
                "subject": {"reference": x.patient},
                "encounter": {"reference": x.encounter},
                "effectiveDateTime": x.at(0, 10),
                "issued": x.at(3, 15),
                "result": [{"reference": r} for r in results],
                "imagingStudy": [{"reference": imaging}],
                "conclusion": f"Screening chest X-ray; {cls[3]}.",
                "conclusionCode": [
                    _cc({"system": f"{MHR}/CodeSystem/tb-classification", "code": tb, "display": cls[3]})
                ],
            }
        )
    document = x.add(
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "type": _cc({"system": LOINC, "code": "64292-6", "display": "Release of information consent"}),
            "subject": {"reference": x.patient},
            "date": x.at(0, 8),
            "description": "Consent to share the pre-departure health assessment with receiving authorities.",
            "content": [
                {
                    "attachment": {
                        "contentType": "application/pdf",
                        "data": "JVBERi0xLjQKJSVFT0YK",
                        "title": "Signed consent form",
                        "creation": x.at(0, 8),
                    }
                }
            ],
            "context": {"encounter": [{"reference": x.encounter}]},
        }
    )
    for authority in AUTHORITIES:
        x.add(_consent(x, authority, document, clinic))
    return _bundle(x, index, seed)


def exam_type_is_refugee(x: _Exam) -> bool:
    encounter = x.entries[1]["resource"]
    return bool(encounter["type"][0]["coding"][0]["code"] == "refugee")


def small_exam(index: int, seed: int = 1, now: datetime | None = None) -> dict[str, Any]:
    """The reduced shape for bulk loading: Patient, Encounter, IGRA, classification, two Consents."""
    rng, x, clinic, _ = _start(index, seed, now or datetime.now(UTC))
    cls = rng.choices(CLASSES, weights=[c[4] for c in CLASSES])[0]
    x.observation(
        "laboratory",
        _cc({"system": LOINC, "code": "71773-6"}, "IGRA interpretation"),
        x.at(1, 13),
        valueCodeableConcept=_cc(IGRA["pos" if cls[2] in ("B1-pulmonary", "B2", "A") else "neg"]),
    )
    _classification(x, cls)
    for authority in AUTHORITIES:
        x.add(_consent(x, authority, None, clinic))
    return _bundle(x, index, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="first exam number")
    parser.add_argument("--small", action="store_true", help="the reduced bulk-load shape")
    parser.add_argument("--out", type=Path, help="NDJSON file (default: stdout)")
    args = parser.parse_args(argv)
    make = small_exam if args.small else exam
    now = datetime.now(UTC)
    out = args.out.open("wb") if args.out else sys.stdout.buffer
    try:
        for i in range(args.start, args.start + args.count):
            out.write(orjson.dumps(make(i, args.seed, now)) + b"\n")
    finally:
        if args.out:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
